"""Cut the dataset (MNIST, Fashion-MNIST) into an attack-start pool and train / valid splits for the target detector, and store them."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eightgen.artifacts import Artifact, read_manifest, write_manifest
from eightgen.config import DIGITS, DatasetConfig
from eightgen.data.sources import MnistData
from eightgen.errors import EightgenError

DATASET_FILE = "dataset.npz"
PARTS = ("train", "valid", "pool")
REFEREE = "ref"  # the optional referee split: images no detector trains or validates on


@dataclass(frozen=True, eq=False)
class Assembled:
    """The three splits of dataset.npz (images, digit labels, source index, source split) and their provenance."""

    x_train: np.ndarray
    y_train: np.ndarray
    i_train: np.ndarray
    s_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    i_valid: np.ndarray
    s_valid: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    i_pool: np.ndarray
    s_pool: np.ndarray
    source: str
    target: int
    balance: str
    seed: int
    x_ref: np.ndarray | None = None
    y_ref: np.ndarray | None = None
    i_ref: np.ndarray | None = None
    s_ref: np.ndarray | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """The splits held: train, valid, pool, and ref when there is a referee split."""
        return PARTS + ((REFEREE,) if self.x_ref is not None else ())

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in dataset.npz, by name."""
        return {f"{k}_{part}": getattr(self, f"{k}_{part}") for part in self.parts for k in "xyis"}

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per digit in each split."""
        return {
            part: {str(d): int(n) for d, n in enumerate(np.bincount(getattr(self, f"y_{part}"), minlength=10))}
            for part in self.parts
        }


def binary_labels(y: np.ndarray, target: int) -> np.ndarray:
    """1 where the digit is the target, else 0 (int64)."""
    return (np.asarray(y) == target).astype(np.int64)


def assemble(data: MnistData, cfg: DatasetConfig) -> Assembled:
    """Hold out a per-digit attack-start pool, split the rest into stratified train / valid, cap and balance train.

    With both a training and a test split in the source, the detector's train and valid come from the training
    split only, and the pool and referee split from the test split only: no attack start and no referee image
    was ever seen in training. A source with one split is cut the same way from that split.
    """
    if not np.any(data.labels == cfg.target):
        raise EightgenError(f"no images of {cfg.classes.label(cfg.target)} in {data.description}")
    real_splits = {"train", "test"} <= set(np.unique(data.split).tolist())
    if cfg.pool_per_digit == "all" and not real_splits:
        raise EightgenError(
            f"pool_per_digit='all' needs a source with a training and a test split; {data.description} has one"
        )
    pool, train, valid, referee = [], [], [], []
    for d in DIGITS:
        # One generator per digit and stage: the pool for a digit stays the same prefix when pool_per_digit grows.
        members = np.flatnonzero(data.labels == d)
        held = members[data.split[members] == "test"] if real_splits else members
        where = f"the test split of {data.description}" if real_splits else data.description
        n_pool = len(held) if cfg.pool_per_digit == "all" else cfg.pool_per_digit
        if len(held) < n_pool:
            raise EightgenError(f"digit {d}: {len(held)} images in {where}, pool_per_digit={n_pool} needs more")
        held = _rng(cfg, 0, d).permutation(held)
        pool.append(held[:n_pool])
        if real_splits:
            unseen, rest = held[n_pool:], _rng(cfg, 4, d).permutation(members[data.split[members] == "train"])
            n_ref = int(round(len(unseen) * cfg.referee_fraction))
            n_valid = int(round(len(rest) * cfg.valid_fraction))
            referee.append(unseen[:n_ref])
            valid.append(rest[:n_valid])
            train.append(rest[n_valid:])
            continue
        rest = held[n_pool:]
        n_valid = int(round(len(rest) * cfg.valid_fraction))
        # The referee split comes after valid, so validation is the same with or without one.
        n_ref = int(round(len(rest) * cfg.referee_fraction))
        valid.append(rest[:n_valid])
        referee.append(rest[n_valid : n_valid + n_ref])
        train.append(rest[n_valid + n_ref :])
    if not sum(len(v) for v in valid):
        raise EightgenError(f"the validation split is empty (valid_fraction={cfg.valid_fraction} of too few images)")
    if cfg.referee_fraction > 0 and not all(len(r) for r in referee):
        empty = [d for d, r in zip(DIGITS, referee) if not len(r)]
        raise EightgenError(f"the referee split holds no images of digit(s) {empty} (raise referee_fraction)")
    if cfg.max_train is not None:
        train = _cap(train, cfg.max_train)
    train_idx = np.concatenate(train)
    n_target = int(np.sum(data.labels[train_idx] == cfg.target))
    if n_target == 0 or n_target == len(train_idx):
        raise EightgenError(
            f"the training split needs {cfg.classes.label(cfg.target)} and other classes, it holds {n_target} of "
            f"{len(train_idx)} images of {cfg.classes.name_of(cfg.target)} (lower pool_per_digit or valid_fraction, or raise max_train)"
        )
    # Separate generators per stage, so that e.g. the balance mode does not change the validation split.
    train_idx = _balance(train_idx, data.labels[train_idx] == cfg.target, cfg.balance, _rng(cfg, 1))
    parts = {
        "train": _rng(cfg, 2).permutation(train_idx),
        "valid": _rng(cfg, 3).permutation(np.concatenate(valid)),
        "pool": np.concatenate(pool),
    }
    if cfg.referee_fraction > 0:
        parts[REFEREE] = np.concatenate(referee)
    fields = {}
    for part, idx in parts.items():
        fields |= {
            f"x_{part}": data.images[idx],
            f"y_{part}": data.labels[idx].astype(np.uint8),
            f"i_{part}": data.index[idx].astype(np.int64),
            f"s_{part}": data.split[idx].astype(str),
        }
    return Assembled(**fields, source=data.description, target=cfg.target, balance=cfg.balance, seed=cfg.seed)


def _rng(cfg: DatasetConfig, *stage: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *stage])


def _cap(per_digit: list[np.ndarray], total: int) -> list[np.ndarray]:
    """Keep `total` images across digits in proportion to each digit's share (largest remainders)."""
    sizes = np.array([len(a) for a in per_digit])
    if total >= sizes.sum():
        return per_digit
    exact = sizes * total / sizes.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: total - quota.sum()]] += 1
    return [a[:q] for a, q in zip(per_digit, quota)]


def _balance(idx: np.ndarray, is_target: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Equalise target and non-target counts: drop random majority images or repeat minority ones."""
    if mode == "none":
        return idx
    pos, neg = idx[is_target], idx[~is_target]
    small, large = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    if mode == "undersample":
        large = np.sort(rng.choice(large, size=len(small), replace=False))
    else:
        repeats, extra = divmod(len(large), len(small))
        small = np.concatenate([np.tile(small, repeats), np.sort(rng.choice(small, size=extra, replace=False))])
    return np.concatenate([small, large])


def save_assembled(a: Assembled, directory: Path) -> Artifact:
    """Write dataset.npz (atomically) and its manifest into directory; return the artifact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (DATASET_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **a.arrays())
    os.replace(tmp, directory / DATASET_FILE)
    meta = {
        "kind": "dataset",
        "source": a.source,
        "target": a.target,
        "balance": a.balance,
        "seed": a.seed,
        "counts": a.counts(),
        "sizes": {part: len(getattr(a, f"y_{part}")) for part in a.parts},
    }
    return write_manifest(directory, meta, [DATASET_FILE])


def load_assembled(directory: Path) -> Assembled:
    """Read a dataset artifact directory, verifying dataset.npz against its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = directory / DATASET_FILE
    if DATASET_FILE not in manifest.get("files", {}):
        raise EightgenError(f"{directory}: manifest does not list {DATASET_FILE}")
    names = [f"{k}_{part}" for part in PARTS for k in "xyis"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise EightgenError(f"{path}: missing arrays {missing}")
            referee = [f"{k}_{REFEREE}" for k in "xyis"]
            if any(n in npz.files for n in referee):
                missing = [n for n in referee if n not in npz.files]
                if missing:
                    raise EightgenError(f"{path}: missing arrays {missing}")
                names += referee
            arrays = {n: npz[n] for n in names}
        return Assembled(
            **arrays,
            source=str(manifest["source"]),
            target=int(manifest["target"]),
            balance=str(manifest["balance"]),
            seed=int(manifest["seed"]),
        )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EightgenError(f"{path}: cannot read dataset ({type(exc).__name__}: {exc})") from None
