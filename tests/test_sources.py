"""MNIST sources: real IDX files, damaged copies, local parquet / save_to_disk data, and the unreachable Hub."""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from eightgen.config import DatasetConfig
from eightgen.data.sources import hub_reachable, load_mnist, resolve_source, source_fingerprint
from eightgen.errors import EightgenError

IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
# Class counts of the MNIST test set as documented with the files (shared/datasets/mnist/README.md).
DOCUMENTED_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
LOCAL_OPTIONS = ("--mnist-dir", "EIGHTGEN_MNIST_DIR", "--local-path")


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed uint8 IDX file holding array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def idx_cfg(directory: Path) -> DatasetConfig:
    return DatasetConfig(source="idx", mnist_dir=directory)


@pytest.fixture(scope="module")
def real(mnist_dir: Path):
    """The real MNIST test set through the IDX source."""
    return load_mnist(idx_cfg(mnist_dir))


# --- IDX ---------------------------------------------------------------------------------------


def test_idx_real_files(real, mnist_dir: Path) -> None:
    assert real.images.shape == (10_000, 28, 28) and real.images.dtype == np.uint8
    assert real.labels.dtype == np.uint8
    assert np.bincount(real.labels, minlength=10).tolist() == DOCUMENTED_COUNTS
    assert set(real.split.tolist()) == {"test"}
    assert np.array_equal(real.index, np.arange(10_000))
    assert str(mnist_dir) in real.description
    # Pixels and labels are the bytes after the 16- and 8-byte IDX headers.
    raw_images = np.frombuffer(gzip.decompress((mnist_dir / IMAGES).read_bytes())[16:], np.uint8)
    raw_labels = np.frombuffer(gzip.decompress((mnist_dir / LABELS).read_bytes())[8:], np.uint8)
    assert np.array_equal(real.images.reshape(-1), raw_images)
    assert np.array_equal(real.labels, raw_labels)


def test_auto_source_resolution(mnist_dir: Path, tmp_path: Path) -> None:
    assert resolve_source(DatasetConfig(mnist_dir=mnist_dir, local_path=tmp_path)) == "idx"
    assert resolve_source(DatasetConfig(local_path=tmp_path)) == "local"
    assert resolve_source(DatasetConfig()) == "hub"
    assert resolve_source(DatasetConfig(source="hub", mnist_dir=mnist_dir)) == "hub"
    with pytest.raises(EightgenError, match="source 'idx' needs mnist_dir"):
        load_mnist(DatasetConfig(source="idx"))


def test_idx_train_and_test_pairs_plain_and_gzipped(real, tmp_path: Path) -> None:
    # A "train" pair of plain files from the first 6,000 images and a gzipped "t10k" pair from the rest.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(real.images[:6000]))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(real.labels[:6000]))
    (tmp_path / IMAGES).write_bytes(gzip.compress(idx_bytes(real.images[6000:]), compresslevel=1))
    (tmp_path / LABELS).write_bytes(gzip.compress(idx_bytes(real.labels[6000:]), compresslevel=1))
    data = load_mnist(idx_cfg(tmp_path))
    assert np.array_equal(data.images, real.images) and np.array_equal(data.labels, real.labels)
    assert (data.split == "train").sum() == 6000 and (data.split == "test").sum() == 4000
    assert np.array_equal(data.index, np.concatenate([np.arange(6000), np.arange(4000)]))


def test_idx_truncated_gz_names_the_file(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / LABELS, tmp_path / LABELS)
    raw = (mnist_dir / IMAGES).read_bytes()
    (tmp_path / IMAGES).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EightgenError, match=IMAGES):
        load_mnist(idx_cfg(tmp_path))


@pytest.mark.parametrize("offset", [1000, 800_000], ids=["bad-deflate-data", "bad-crc"])
def test_idx_damaged_gz_stream_names_the_file(mnist_dir: Path, tmp_path: Path, offset: int) -> None:
    shutil.copy(mnist_dir / LABELS, tmp_path / LABELS)
    raw = bytearray((mnist_dir / IMAGES).read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    (tmp_path / IMAGES).write_bytes(bytes(raw))
    with pytest.raises(EightgenError, match=IMAGES):
        load_mnist(idx_cfg(tmp_path))


def test_idx_count_mismatch(real, tmp_path: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / IMAGES, tmp_path / IMAGES)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(real.labels[:9000]))
    with pytest.raises(EightgenError, match="10000 images.*9000 labels"):
        load_mnist(idx_cfg(tmp_path))


def test_idx_labels_must_be_digits(real, tmp_path: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / IMAGES, tmp_path / IMAGES)
    labels = real.labels.copy()
    labels[5] = 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(EightgenError, match="label 10"):
        load_mnist(idx_cfg(tmp_path))


def test_idx_wrong_image_shape(real, tmp_path: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / LABELS, tmp_path / LABELS)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(real.images[:, :27, :]))
    with pytest.raises(EightgenError, match=r"\[10000, 27, 28\]"):
        load_mnist(idx_cfg(tmp_path))


def test_idx_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="does not exist") as err:
        load_mnist(idx_cfg(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)


def test_idx_images_without_labels(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / IMAGES, tmp_path / IMAGES)
    with pytest.raises(EightgenError, match="t10k-labels-idx1-ubyte") as err:
        load_mnist(idx_cfg(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_idx_empty_directory_lists_expected_names(tmp_path: Path) -> None:
    with pytest.raises(EightgenError) as err:
        load_mnist(idx_cfg(tmp_path))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_fingerprint_follows_content(mnist_dir: Path, tmp_path: Path) -> None:
    for name in (IMAGES, LABELS):
        shutil.copy(mnist_dir / name, tmp_path / name)
    original = source_fingerprint(idx_cfg(mnist_dir))
    assert source_fingerprint(idx_cfg(tmp_path)) == original
    raw = gzip.decompress((tmp_path / LABELS).read_bytes())
    (tmp_path / LABELS).write_bytes(gzip.compress(raw[:-1] + bytes([(raw[-1] + 1) % 10])))
    assert source_fingerprint(idx_cfg(tmp_path)) != original
    hub = source_fingerprint(DatasetConfig(source="hub", hub_name="someone/mnist"))
    assert hub == {"source": "hub", "name": "someone/mnist"}


# --- local Hugging Face data -------------------------------------------------------------------

FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
)


def hf_split(real, lo: int, hi: int) -> datasets.Dataset:
    """A datasets split of real MNIST images lo:hi, stored the way ylecun/mnist stores them (PNG + ClassLabel)."""
    images = [Image.fromarray(a) for a in real.images[lo:hi]]
    return datasets.Dataset.from_dict({"image": images, "label": real.labels[lo:hi].tolist()}, features=FEATURES)


@pytest.fixture(scope="module")
def hf_dirs(real, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small real train (images 0:400) / test (400:600) dataset as parquet files and via save_to_disk."""
    root = tmp_path_factory.mktemp("hf")
    train, test = hf_split(real, 0, 400), hf_split(real, 400, 600)
    (root / "parquet" / "mnist").mkdir(parents=True)
    train.to_parquet(root / "parquet" / "mnist" / "train-00000-of-00001.parquet")
    test.to_parquet(root / "parquet" / "mnist" / "test-00000-of-00001.parquet")
    datasets.DatasetDict(train=train, test=test).save_to_disk(root / "disk")
    return {"parquet": root / "parquet", "disk": root / "disk"}


def local(path: Path):
    return load_mnist(DatasetConfig(source="local", local_path=path))


@pytest.mark.parametrize("kind", ["parquet", "disk"])
def test_local_dataset_equals_its_source(real, hf_dirs: dict[str, Path], kind: str) -> None:
    data = local(hf_dirs[kind])
    assert np.array_equal(data.images, real.images[:600])
    assert np.array_equal(data.labels, real.labels[:600])
    assert data.split.tolist() == ["train"] * 400 + ["test"] * 200
    assert np.array_equal(data.index, np.concatenate([np.arange(400), np.arange(200)]))
    assert str(hf_dirs[kind]) in data.description


def test_local_single_parquet_file_takes_its_split_from_the_name(real, hf_dirs: dict[str, Path]) -> None:
    data = local(hf_dirs["parquet"] / "mnist" / "test-00000-of-00001.parquet")
    assert np.array_equal(data.images, real.images[400:600])
    assert set(data.split.tolist()) == {"test"}


def test_local_other_split_names(real, tmp_path: Path) -> None:
    # A validation split is carved out of training data: it joins "train" with indices continuing after it.
    splits = {"train": hf_split(real, 0, 300), "validation": hf_split(real, 300, 400), "test": hf_split(real, 400, 500)}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "d")
    data = local(tmp_path / "d")
    assert np.array_equal(data.images, real.images[:500])
    assert data.split.tolist() == ["train"] * 400 + ["test"] * 100
    assert np.array_equal(data.index, np.concatenate([np.arange(400), np.arange(100)]))
    # A single saved Dataset without a split name counts as training data.
    hf_split(real, 0, 50).save_to_disk(tmp_path / "single")
    assert set(local(tmp_path / "single").split.tolist()) == {"train"}


def test_local_bad_inputs(real, tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="local dataset .*nowhere does not exist"):
        local(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EightgenError, match=r"notes\.txt: expected a \.parquet file, a folder of them or a save_to_disk folder"):
        local(tmp_path / "notes.txt")
    wrong = datasets.Dataset.from_dict({"img": [Image.fromarray(real.images[0])], "label": [1]})
    wrong.to_parquet(tmp_path / "wrong.parquet")
    with pytest.raises(EightgenError, match="'image' and 'label'"):
        local(tmp_path / "wrong.parquet")
    big = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (32, 32))], "label": [3]},
        features=FEATURES,
    )
    big.to_parquet(tmp_path / "big.parquet")
    with pytest.raises(EightgenError, match="32x32"):
        local(tmp_path / "big.parquet")


# --- the Hub, unreachable here -----------------------------------------------------------------


def test_hub_unreachable_fails_fast_naming_local_options() -> None:
    # A name that does not exist, so that a machine with a network fails as well instead of downloading.
    start = time.monotonic()
    with pytest.raises(EightgenError) as err:
        load_mnist(DatasetConfig(source="hub", hub_name="eightgen-tests/no-such-dataset"))
    assert time.monotonic() - start < 30
    for option in LOCAL_OPTIONS:
        assert option in str(err.value)


def test_probe_gives_up_on_a_silent_server() -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        assert not hub_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.monotonic() - start < 5


def test_probe_and_load_against_an_answering_endpoint() -> None:
    # Any HTTP answer counts as reachable; load_dataset's own failure then still ends in an EightgenError.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert hub_reachable(endpoint, timeout=5.0)
        result = run_hub_load({"HF_ENDPOINT": endpoint})
    finally:
        server.shutdown()
    assert "EightgenError" in result.stderr and "cannot load" in result.stderr
    assert all(option in result.stderr for option in LOCAL_OPTIONS)


def test_hub_offline_mode_fails_fast_without_probing() -> None:
    start = time.monotonic()
    result = run_hub_load({"HF_HUB_OFFLINE": "1"})
    assert time.monotonic() - start < 30
    assert "EightgenError" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert all(option in result.stderr for option in LOCAL_OPTIONS)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def run_hub_load(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Load from the Hub in a fresh interpreter (the Hub settings are read at import) with extra env."""
    code = (
        "from eightgen.config import DatasetConfig; from eightgen.data.sources import load_mnist; "
        "load_mnist(DatasetConfig(source='hub', hub_name='eightgen-tests/no-such-dataset'))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True, timeout=120
    )
