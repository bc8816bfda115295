"""Sources of MNIST and Fashion-MNIST: the Hugging Face Hub, local IDX files, or local parquet / save_to_disk data."""

from __future__ import annotations

import io
import re
import threading
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eightgen.artifacts import sha256_file
from eightgen.config import DatasetConfig
from eightgen.data.idx import read_idx
from eightgen.errors import EightgenError

SourceKind = Literal["hub", "idx", "local"]
SPLITS = ("train", "test")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
LOCAL_OPTIONS = (
    "use local data instead: --mnist-dir DIR (or EIGHTGEN_MNIST_DIR) for the IDX files, "
    "or --local-path PATH for a parquet file/folder or a save_to_disk folder"
)
HUB_PROBE_SECONDS = 5.0


@dataclass(frozen=True, eq=False)
class MnistData:
    """Every image of a source (MNIST or Fashion-MNIST) with its class index, source split and index within that split."""

    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N], class index 0-9
    split: np.ndarray  # str [N], "train" | "test"
    index: np.ndarray  # int64 [N], index within its split
    description: str

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.shape != (n, 28, 28) or len(self.split) != n or len(self.index) != n:
            raise EightgenError(
                f"{self.description}: inconsistent shapes images {self.images.shape}, labels {self.labels.shape}, "
                f"split {self.split.shape}, index {self.index.shape}"
            )


def resolve_source(cfg: DatasetConfig) -> SourceKind:
    """The source a config means: its explicit source, or for "auto" idx, then local, then the Hub."""
    if cfg.source != "auto":
        return cfg.source
    if cfg.mnist_dir is not None:
        return "idx"
    if cfg.local_path is not None:
        return "local"
    return "hub"


def load_mnist(cfg: DatasetConfig) -> MnistData:
    """Load every image and label of the dataset (MNIST or Fashion-MNIST) from the source the config names."""
    kind = resolve_source(cfg)
    title = cfg.classes.title
    if kind == "idx":
        return _load_idx(_required(cfg.mnist_dir, "idx", "mnist_dir (--mnist-dir DIR or EIGHTGEN_MNIST_DIR)"), title)
    if kind == "local":
        return _load_local(_required(cfg.local_path, "local", "local_path (--local-path PATH)"))
    return _load_hub(cfg.hub)


def source_fingerprint(cfg: DatasetConfig) -> dict[str, Any]:
    """A cheap JSON-able summary of the source's content: file sha256s, or the Hub dataset name."""
    kind = resolve_source(cfg)
    if kind == "idx":
        directory = _required(cfg.mnist_dir, "idx", "mnist_dir")
        files = [p for pair in _idx_pairs(directory, cfg.classes.title).values() for p in pair]
        return {"source": "idx", "files": {p.name: sha256_file(p) for p in files}}
    if kind == "local":
        path = _required(cfg.local_path, "local", "local_path")
        if not path.exists():
            raise EightgenError(f"local dataset {path} does not exist")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        root = path.parent if path.is_file() else path
        return {"source": "local", "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in files}}
    return {"source": "hub", "name": cfg.hub}


def _required(value: Path | None, kind: str, what: str) -> Path:
    if value is None:
        raise EightgenError(f"source {kind!r} needs {what}")
    return Path(value)


# --- IDX files ---------------------------------------------------------------------------------


def _idx_file(directory: Path, stem: str) -> Path | None:
    """The plain or gzipped IDX file of that name, the plain one first."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_pairs(directory: Path, title: str = "MNIST") -> dict[str, tuple[Path, Path]]:
    """The complete (images, labels) file pairs in directory, by split; error on none or a half pair."""
    if not directory.is_dir():
        raise EightgenError(f"{title} directory {directory} {'is a file, not a folder' if directory.exists() else 'does not exist'}")
    pairs: dict[str, tuple[Path, Path]] = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images, labels = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
        if images is not None and labels is not None:
            pairs[split] = (images, labels)
        elif images is not None or labels is not None:
            found, missing = (images, label_stem) if images is not None else (labels, image_stem)
            raise EightgenError(f"{directory}: {found.name} has no partner {missing}[.gz]")
    if not pairs:
        expected = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
        raise EightgenError(f"{directory}: no {title} IDX files (expected {expected})")
    return pairs


def _read_idx_file(path: Path) -> np.ndarray:
    try:
        return read_idx(path)
    except zlib.error as exc:  # a damaged gzip stream raises zlib.error, which is not an OSError
        raise EightgenError(f"{path}: corrupt gzip data ({exc})") from None


def _load_idx(directory: Path, title: str = "MNIST") -> MnistData:
    images, labels, counts = [], [], {}
    for split, (image_path, label_path) in _idx_pairs(directory, title).items():
        x, y = _read_idx_file(image_path), _read_idx_file(label_path)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise EightgenError(f"{image_path}: expected uint8 images [N, 28, 28], got {x.dtype} {list(x.shape)}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise EightgenError(f"{label_path}: expected uint8 labels [N], got {y.dtype} {list(y.shape)}")
        if len(x) != len(y):
            raise EightgenError(f"{directory}: {image_path.name} holds {len(x)} images, {label_path.name} {len(y)} labels")
        if len(y) and y.max() > 9:
            raise EightgenError(f"{label_path}: label {int(y.max())} is not a class index 0-9")
        images.append(x)
        labels.append(y)
        counts[split] = len(y)
    return _combine(images, labels, counts, f"{title} IDX files in {directory}")


def _combine(images: list[np.ndarray], labels: list[np.ndarray], counts: dict[str, int], where: str) -> MnistData:
    """One MnistData from per-split arrays given in the order of counts."""
    sizes = ", ".join(f"{split} {n}" for split, n in counts.items())
    return MnistData(
        images=np.ascontiguousarray(np.concatenate(images), dtype=np.uint8),
        labels=np.concatenate(labels).astype(np.uint8),
        split=np.concatenate([np.full(n, split) for split, n in counts.items()]).astype(str),
        index=np.concatenate([np.arange(n, dtype=np.int64) for n in counts.values()]),
        description=f"{where} ({sizes})",
    )


# --- Hugging Face datasets (Hub and local) -----------------------------------------------------


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether an HTTP server answers at endpoint within timeout seconds (any status counts)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    # A thread bounds the whole probe: the socket timeout does not cover name resolution.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _load_hub(name: str) -> MnistData:
    import datasets
    from huggingface_hub import constants

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not offline and not hub_reachable(constants.ENDPOINT):
        raise EightgenError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} for {name!r}; {LOCAL_OPTIONS}")
    try:
        loaded = datasets.load_dataset(name)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        state = "offline mode (HF_HUB_OFFLINE) and no cached copy" if offline else type(exc).__name__
        raise EightgenError(f"cannot load {name!r} from the Hugging Face Hub ({state}: {exc}); {LOCAL_OPTIONS}") from None
    return _from_hf(loaded, f"Hugging Face Hub dataset {name}")


def _load_local(path: Path) -> MnistData:
    if not path.exists():
        raise EightgenError(f"local dataset {path} does not exist")
    if path.is_file() and path.suffix != ".parquet":
        raise EightgenError(f"local dataset {path}: expected a .parquet file, a folder of them or a save_to_disk folder")
    import datasets  # seconds to import: only once the path is plausible
    try:
        if path.is_file():
            loaded = datasets.load_dataset("parquet", data_files={_split_name(path.stem): str(path)})
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise EightgenError(f"local dataset {path}: cannot load ({type(exc).__name__}: {exc})") from None
    return _from_hf(loaded, f"local dataset {path}")


def _split_name(name: str) -> str:
    """Map a source split or file name to "test" (test / t10k / eval) or "train" (everything else)."""
    return "test" if re.search(r"(^|[^a-z])(test|testing|t10k|eval)([^a-z]|$)", name.lower()) else "train"


def _from_hf(loaded: Any, where: str) -> MnistData:
    """Convert a datasets Dataset or DatasetDict with image and label columns into MnistData."""
    import datasets

    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(loaded.split or "train", loaded)]
    grouped: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    for name, ds in parts:
        grouped[_split_name(str(name))].append(_decode_split(ds, f"{where} split {name!r}"))
    counts = {split: sum(len(y) for _, y in grouped[split]) for split in SPLITS if grouped[split]}
    if not counts or not sum(counts.values()):
        raise EightgenError(f"{where}: no images")
    pairs = [pair for split in SPLITS for pair in grouped[split]]
    return _combine([x for x, _ in pairs], [y for _, y in pairs], counts, where)


def _decode_split(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 28, 28] and class indices uint8 [n] of one datasets split, read from its arrow data.

    A ClassLabel of digit names (MNIST's "0".."9", in any order) maps each index to its digit; any other ClassLabel
    of ten names (Fashion-MNIST's "T - shirt / top", "Trouser", ...) keeps its indices 0-9.
    """
    import datasets

    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        raise EightgenError(f"{where}: columns {ds.column_names}, expected 'image' and 'label'")
    table = ds.select_columns(["image", "label"]).with_format("arrow")[:]
    images = _decode_images(table.column("image").combine_chunks(), where)
    raw = table.column("label").to_numpy(zero_copy_only=False)
    if not np.issubdtype(raw.dtype, np.integer):
        raise EightgenError(f"{where}: labels are {raw.dtype}, expected integers")
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel) and all(n.isdigit() for n in feature.names):
        if len(raw) and (raw.min() < 0 or raw.max() >= len(feature.names)):
            raise EightgenError(f"{where}: label index outside the {len(feature.names)} class names")
        raw = np.array([int(n) for n in feature.names])[raw] if len(raw) else raw
    elif isinstance(feature, datasets.ClassLabel) and len(feature.names) != 10:
        raise EightgenError(f"{where}: the label has {len(feature.names)} classes ({', '.join(feature.names[:12])}), expected 10")
    if len(raw) and (raw.min() < 0 or raw.max() > 9):
        raise EightgenError(f"{where}: labels must be class indices 0-9, found {int(raw.min())}..{int(raw.max())}")
    return images, raw.astype(np.uint8)


def _decode_images(column: Any, where: str) -> np.ndarray:
    """Decode an arrow image column: {"bytes", "path"} structs (encoded images) or nested pixel lists."""
    import pyarrow as pa

    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        data = column.field("bytes").to_pylist()
        paths = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else [None] * len(data)
        images = np.empty((len(data), 28, 28), dtype=np.uint8)
        for i, (blob, path) in enumerate(zip(data, paths)):
            images[i] = _decode_one(blob, path, f"{where} image {i}")
        return images
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        images = np.asarray(column.to_pylist())
        if images.shape[1:] != (28, 28) or not np.issubdtype(images.dtype, np.integer):
            raise EightgenError(f"{where}: pixel arrays are {images.dtype} {list(images.shape)}, expected [n, 28, 28] 0-255")
        if len(images) and (images.min() < 0 or images.max() > 255):
            raise EightgenError(f"{where}: pixel values outside 0-255")
        return images.astype(np.uint8)
    raise EightgenError(f"{where}: image column of type {column.type}, expected encoded images or pixel arrays")


def _decode_one(blob: bytes | None, path: str | None, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if blob is None and path is None:
        raise EightgenError(f"{where}: neither bytes nor a path")
    try:
        with Image.open(io.BytesIO(blob) if blob is not None else path) as img:
            pixels = np.asarray(img if img.mode == "L" else img.convert("L"))
    except (OSError, UnidentifiedImageError, TypeError, ValueError) as exc:
        raise EightgenError(f"{where}: cannot decode ({exc})") from None
    if pixels.shape != (28, 28):
        raise EightgenError(f"{where}: size {pixels.shape[1]}x{pixels.shape[0]}, expected 28x28")
    return pixels
