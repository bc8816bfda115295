"""Attack starts: order, metadata, pool picks and noise that does not depend on how many seeds are asked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from eightgen.config import IMAGENET_MEAN, IMAGENET_STD, AttackConfig
from eightgen.data.starts import make_starts
from eightgen.errors import EightgenError

ONE = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
RGB = (torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))


@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shuffled pool of 6 images per digit with distinct source indices."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 6))
    x = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
    index = rng.permutation(10_000)[: len(y)].astype(np.int64)
    return x, y, index


def test_order_and_metadata(pool) -> None:
    x, y, index = pool
    cfg = AttackConfig(start_digits=(2, 0), seeds=3, method="gd")
    starts = make_starts(cfg, x, y, index, 1, *ONE)
    meta = starts.meta
    assert meta.run_id.tolist() == [f"{k}-s{s:04d}" for k in ("noise", "d2", "d0") for s in range(3)]
    assert meta.start_kind.tolist() == ["noise"] * 3 + ["digit"] * 6
    assert meta.seed.tolist() == [0, 1, 2] * 3
    assert str(meta.start_digit.dtype) == "Int64" and str(meta.source_index.dtype) == "Int64"
    assert meta.start_digit[:3].isna().all() and meta.source_index[:3].isna().all()
    assert meta.start_digit[3:].tolist() == [2, 2, 2, 0, 0, 0]
    for digit, rows in ((2, slice(3, 6)), (0, slice(6, 9))):
        picked = np.flatnonzero(y == digit)[:3]  # the first `seeds` images of the digit, in pool order
        assert meta.source_index[rows].tolist() == index[picked].tolist()
        np.testing.assert_array_equal(starts.x0[rows, 0].numpy(), x[picked] / np.float32(255))
    assert starts.x0.shape == (9, 1, 28, 28) and starts.x0.dtype == torch.float32 and len(starts) == 9


def test_without_noise_and_with_three_channels(pool) -> None:
    x, y, index = pool
    starts = make_starts(AttackConfig(start_digits=(7,), include_noise=False, seeds=2), x, y, index, 3, *RGB)
    assert starts.meta.run_id.tolist() == ["d7-s0000", "d7-s0001"]
    assert starts.x0.shape == (2, 3, 28, 28)
    assert torch.equal(starts.x0[:, 0], starts.x0[:, 1]) and torch.equal(starts.x0[:, 0], starts.x0[:, 2])


@pytest.mark.parametrize("noise", ["uniform", "normal"])
def test_noise_does_not_depend_on_how_many_seeds_are_asked(pool, noise: str) -> None:
    x, y, index = pool
    few = make_starts(AttackConfig(start_digits=(), seeds=4, noise=noise), x, y, index, 3, *RGB)
    many = make_starts(AttackConfig(start_digits=(), seeds=8, noise=noise), x, y, index, 3, *RGB)
    assert many.meta.run_id[3] == few.meta.run_id[3] == "noise-s0003"
    assert torch.equal(few.x0, many.x0[:4])
    assert torch.equal(few.x0, make_starts(AttackConfig(start_digits=(), seeds=4, noise=noise), x, y, index, 3, *RGB).x0)
    assert not torch.equal(few.x0[0], few.x0[1])


def test_noise_kinds(pool) -> None:
    x, y, index = pool
    seed = make_starts(AttackConfig(start_digits=(), seeds=16, method="seed"), x, y, index, 3, *RGB).x0
    pixels = seed.permute(1, 0, 2, 3).reshape(3, -1)
    # 'auto' with method seed: the notebook's randn in normalised space, i.e. mean + std * N(0, 1) in pixels.
    torch.testing.assert_close(pixels.mean(dim=1), torch.tensor(IMAGENET_MEAN), atol=0.01, rtol=0)
    torch.testing.assert_close(pixels.std(dim=1), torch.tensor(IMAGENET_STD), atol=0.01, rtol=0)
    assert not torch.equal(seed[:, 0], seed[:, 1])  # independent per channel
    uniform = make_starts(AttackConfig(start_digits=(), seeds=16, method="gd"), x, y, index, 1, *ONE).x0
    assert uniform.min() >= 0 and uniform.max() <= 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01


def test_short_pools_and_bad_inputs_are_errors(pool) -> None:
    x, y, index = pool
    with pytest.raises(EightgenError, match="6 images of digit 3, fewer than seeds=7"):
        make_starts(AttackConfig(start_digits=(3,), seeds=7), x, y, index, 1, *ONE)
    with pytest.raises(EightgenError, match="uint8"):
        make_starts(AttackConfig(seeds=2), x.astype(np.float32), y, index, 1, *ONE)
    with pytest.raises(EightgenError, match="differ in length"):
        make_starts(AttackConfig(seeds=2), x, y[:-1], index, 1, *ONE)
    with pytest.raises(EightgenError, match="mean has 3 values"):
        make_starts(AttackConfig(seeds=2), x, y, index, 1, *RGB)


def test_meta_frame_is_plain_pandas(pool) -> None:
    x, y, index = pool
    meta = make_starts(AttackConfig(start_digits=(5,), seeds=2), x, y, index, 1, *ONE).meta
    assert type(meta) is pd.DataFrame  # not a subclass
    assert meta.columns.tolist() == ["run_id", "start_kind", "start_digit", "source_index", "seed"]
    assert meta.index.tolist() == list(range(4))
