"""Dataset assembly on real MNIST: pool, stratified splits, balancing, and the stored artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eightgen.artifacts import read_manifest, sha256_file
from eightgen.config import DatasetConfig
from eightgen.data.assembly import PARTS, Assembled, assemble, binary_labels, load_assembled, save_assembled
from eightgen.data.sources import MnistData, load_mnist
from eightgen.errors import EightgenError


@pytest.fixture(scope="module")
def data(mnist_dir: Path) -> MnistData:
    return load_mnist(DatasetConfig(source="idx", mnist_dir=mnist_dir))


def cfg_for(mnist_dir: Path, **kw) -> DatasetConfig:
    return DatasetConfig(source="idx", mnist_dir=mnist_dir, **kw)


def keys(a: Assembled, part: str) -> set[tuple[str, int]]:
    return set(zip(getattr(a, f"s_{part}").tolist(), getattr(a, f"i_{part}").tolist()))


def same(a: Assembled, b: Assembled) -> bool:
    return all(np.array_equal(a.arrays()[k], b.arrays()[k]) for k in a.arrays())


def test_binary_labels() -> None:
    y = np.array([8, 3, 8, 0], dtype=np.uint8)
    out = binary_labels(y, 8)
    assert out.dtype == np.int64 and out.tolist() == [1, 0, 1, 0]
    assert binary_labels(y, 3).tolist() == [0, 1, 0, 0]


def test_deterministic_for_a_seed(data: MnistData, mnist_dir: Path) -> None:
    cfg = cfg_for(mnist_dir, pool_per_digit=16, max_train=2000, seed=3)
    assert same(assemble(data, cfg), assemble(data, cfg))
    other = assemble(data, replace_cfg(cfg, seed=4))
    for part in PARTS:
        assert not np.array_equal(getattr(assemble(data, cfg), f"i_{part}"), getattr(other, f"i_{part}"))


def replace_cfg(cfg: DatasetConfig, **kw) -> DatasetConfig:
    return cfg.model_copy(update=kw)


def test_pool_and_splits_partition_the_source(data: MnistData, mnist_dir: Path) -> None:
    a = assemble(data, cfg_for(mnist_dir, pool_per_digit=20, valid_fraction=0.2))
    pool, train, valid = keys(a, "pool"), keys(a, "train"), keys(a, "valid")
    assert len(pool) == 200 and not pool & train and not pool & valid and not train & valid
    # Without cap or balancing every source image lands in exactly one split.
    assert len(pool) + len(train) + len(valid) == len(data.labels)
    assert len(train) == len(a.y_train) and len(valid) == len(a.y_valid)
    assert np.bincount(a.y_pool, minlength=10).tolist() == [20] * 10
    # Images and labels are those of the source at (split, index).
    pos = {k: n for n, k in enumerate(zip(data.split.tolist(), data.index.tolist()))}
    for part in PARTS:
        rows = [pos[k] for k in zip(getattr(a, f"s_{part}").tolist(), getattr(a, f"i_{part}").tolist())]
        assert np.array_equal(getattr(a, f"x_{part}"), data.images[rows])
        assert np.array_equal(getattr(a, f"y_{part}"), data.labels[rows])


def test_pool_prefix_is_stable_when_it_grows(data: MnistData, mnist_dir: Path) -> None:
    small = assemble(data, cfg_for(mnist_dir, pool_per_digit=8))
    large = assemble(data, cfg_for(mnist_dir, pool_per_digit=16))
    for d in range(10):
        prefix = small.i_pool[small.y_pool == d]
        assert len(prefix) == 8 and np.array_equal(large.i_pool[large.y_pool == d][:8], prefix)


def test_stratification_keeps_digit_shares(data: MnistData, mnist_dir: Path) -> None:
    a = assemble(data, cfg_for(mnist_dir, pool_per_digit=16, valid_fraction=0.25, max_train=3000))
    source = np.bincount(data.labels, minlength=10) - 16
    for part, n in (("train", 3000), ("valid", None)):
        counts = np.bincount(getattr(a, f"y_{part}"), minlength=10)
        if n is not None:
            assert counts.sum() == n
        # Each digit's share matches the source's within one image's rounding per digit.
        assert np.all(np.abs(counts - source * counts.sum() / source.sum()) <= 1.0)


@pytest.mark.parametrize("mode", ["undersample", "oversample"])
def test_balance_equalises_train_only(data: MnistData, mnist_dir: Path, mode: str) -> None:
    natural = assemble(data, cfg_for(mnist_dir, pool_per_digit=16, max_train=3000))
    a = assemble(data, cfg_for(mnist_dir, pool_per_digit=16, max_train=3000, balance=mode))
    n8, n_natural8 = int((a.y_train == 8).sum()), int((natural.y_train == 8).sum())
    assert n8 == int((a.y_train != 8).sum())
    if mode == "undersample":
        assert n8 == n_natural8 and len(a.y_train) == 2 * n_natural8
        assert keys(a, "train") <= keys(natural, "train")
    else:
        assert n8 == int((natural.y_train != 8).sum())
        assert keys(a, "train") == keys(natural, "train")
        # Repeats are spread evenly: each 8 occurs floor or ceil(n8 / n_natural8) times.
        _, reps = np.unique(a.i_train[a.y_train == 8], return_counts=True)
        assert len(reps) == n_natural8 and n8 > n_natural8  # every natural 8 is kept, and some repeat
        assert set(reps.tolist()) <= {n8 // n_natural8, -(-n8 // n_natural8)}
    assert same_part(a, natural, "valid") and same_part(a, natural, "pool")


def same_part(a: Assembled, b: Assembled, part: str) -> bool:
    return np.array_equal(getattr(a, f"i_{part}"), getattr(b, f"i_{part}"))


def test_no_target_digit(data: MnistData, mnist_dir: Path) -> None:
    keep = data.labels != 8
    no8 = MnistData(data.images[keep], data.labels[keep], data.split[keep], data.index[keep], "MNIST without 8s")
    with pytest.raises(EightgenError, match="no images of digit 8 in MNIST without 8s"):
        assemble(no8, cfg_for(mnist_dir))


def test_pool_needs_enough_images_per_digit(data: MnistData, mnist_dir: Path) -> None:
    few = int(np.bincount(data.labels).min())
    with pytest.raises(EightgenError, match="pool_per_digit"):
        assemble(data, cfg_for(mnist_dir, pool_per_digit=few + 1))
    # Only 20 eights, all of them taken by the pool: nothing left to train the detector on.
    keep = (data.labels != 8) | (np.cumsum(data.labels == 8) <= 20)
    few8 = MnistData(data.images[keep], data.labels[keep], data.split[keep], data.index[keep], "MNIST with 20 8s")
    with pytest.raises(EightgenError, match="training split needs digit 8"):
        assemble(few8, cfg_for(mnist_dir, pool_per_digit=20))


def test_save_load_round_trip(data: MnistData, mnist_dir: Path, tmp_path: Path) -> None:
    a = assemble(data, cfg_for(mnist_dir, pool_per_digit=16, max_train=1000, balance="undersample", seed=7))
    art = save_assembled(a, tmp_path / "ds")
    assert art.path == tmp_path / "ds" and art.sha256 == sha256_file(tmp_path / "ds" / "manifest.json")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["dataset.npz", "manifest.json"]
    b = load_assembled(tmp_path / "ds")
    assert same(a, b)
    assert (b.source, b.target, b.balance, b.seed) == (data.description, 8, "undersample", 7)
    assert b.s_train.dtype.kind == "U" and b.i_train.dtype == np.int64 and b.x_train.dtype == np.uint8
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["counts"]["pool"] == {str(d): 16 for d in range(10)}
    assert manifest["counts"]["train"]["8"] == int((a.y_train == 8).sum())
    assert sum(manifest["counts"]["valid"].values()) == len(a.y_valid)
    assert (manifest["source"], manifest["balance"], manifest["seed"]) == (data.description, "undersample", 7)
    # The npz keys are exactly the documented contract.
    with np.load(tmp_path / "ds" / "dataset.npz") as npz:
        assert sorted(npz.files) == sorted(f"{k}_{p}" for k in "xyis" for p in PARTS)


def test_corrupt_npz_detected(data: MnistData, mnist_dir: Path, tmp_path: Path) -> None:
    save_assembled(assemble(data, cfg_for(mnist_dir, pool_per_digit=16, max_train=500)), tmp_path)
    path = tmp_path / "dataset.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(EightgenError, match="dataset.npz"):
        load_assembled(tmp_path)


def test_unreadable_npz_with_matching_manifest(tmp_path: Path, data: MnistData, mnist_dir: Path) -> None:
    save_assembled(assemble(data, cfg_for(mnist_dir, pool_per_digit=16, max_train=500)), tmp_path)
    (tmp_path / "dataset.npz").write_bytes(b"not a zip file")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"]["dataset.npz"] = sha256_file(tmp_path / "dataset.npz")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EightgenError, match="cannot read dataset"):
        load_assembled(tmp_path)


def test_with_both_splits_training_never_sees_a_start_or_a_referee_image(data: MnistData) -> None:
    # a two-split source made from the real test images: the first 7,000 as "train", the rest as "test"
    split = np.where(np.arange(len(data.labels)) < 7000, "train", "test")
    both = MnistData(data.images, data.labels, split, data.index, "real MNIST cut in two")
    cfg = DatasetConfig(pool_per_digit=16, referee_fraction=0.2, seed=3)
    a = assemble(both, cfg)
    assert set(a.s_pool) == {"test"} and set(a.s_ref) == {"test"}
    assert set(a.s_train) == {"train"} and set(a.s_valid) == {"train"}
    assert np.bincount(a.y_pool, minlength=10).tolist() == [16] * 10
    # every "train" image is in train or valid; the test images not in the pool are the referee's, a fifth of them
    assert len(a.y_train) + len(a.y_valid) == 7000
    unseen = np.bincount(data.labels[7000:], minlength=10) - 16
    assert np.bincount(a.y_ref, minlength=10).tolist() == [int(round(n * 0.2)) for n in unseen]
    assert not keys(a, "pool") & (keys(a, "train") | keys(a, "valid"))
    # a test split too small for the pool names it
    with pytest.raises(EightgenError, match=r"^digit 0: \d+ images in the test split of real MNIST cut in two, pool_per_digit=5000"):
        assemble(both, cfg.model_copy(update={"pool_per_digit": 5000}))
