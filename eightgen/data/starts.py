"""Attack starts: noise images and real pool digits, in pixel space, with one metadata row each."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from eightgen.config import AttackConfig
from eightgen.data.grid import META_COLUMNS, start_table
from eightgen.errors import EightgenError


@dataclass(frozen=True)
class Starts:
    """A batch of start images x0 [n, C, 28, 28] (pixel space) and their metadata rows."""

    x0: Tensor
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.meta)


def noise_seed(seed: int) -> int:
    """The generator seed of noise start `seed`: a function of the seed alone, so chunking never changes it."""
    return int.from_bytes(hashlib.sha256(f"eightgen-noise-{seed}".encode()).digest()[:8], "little") >> 1


def noise_kind(cfg: AttackConfig) -> str:
    """The noise in force: 'normal' (the notebook's randn in model input space) for method seed, else 'uniform'."""
    if cfg.noise != "auto":
        return cfg.noise
    return "normal" if cfg.method == "seed" else "uniform"


def noise_image(seed: int, kind: str, channels: int, mean: Tensor, std: Tensor) -> Tensor:
    """One noise start [C, 28, 28]: U[0,1] pixels, or mean + std * N(0,1) (independent per channel)."""
    gen = torch.Generator().manual_seed(noise_seed(seed))
    if kind == "uniform":
        return torch.rand(channels, 28, 28, generator=gen)
    if kind == "normal":
        return mean.reshape(channels, 1, 1) + std.reshape(channels, 1, 1) * torch.randn(channels, 28, 28, generator=gen)
    raise EightgenError(f"unknown noise kind {kind!r} (expected 'uniform' or 'normal')")


def _channel_stats(values: Tensor, channels: int, name: str) -> Tensor:
    """mean or std as a float32 CPU tensor of `channels` values (accepts [C] or [1, C, 1, 1])."""
    t = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    if t.numel() != channels:
        raise EightgenError(f"{name} has {t.numel()} values, expected one per channel ({channels})")
    return t


def make_starts(
    cfg: AttackConfig,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    pool_index: np.ndarray,
    channels: int,
    mean: Tensor,
    std: Tensor,
    rows: slice = slice(None),
) -> Starts:
    """The starts `rows` of the grid: noise (if include_noise) then pool digits in cfg.start_digits order.

    Only the images of the rows asked for are made, so a chunk of a large grid costs its own size."""
    if channels not in (1, 3):
        raise EightgenError(f"channels must be 1 or 3, got {channels}")
    pool_x, pool_y, pool_index = np.asarray(pool_x), np.asarray(pool_y), np.asarray(pool_index)
    if pool_x.ndim != 3 or pool_x.shape[1:] != (28, 28) or pool_x.dtype != np.uint8:
        raise EightgenError(f"pool images must be uint8 [P, 28, 28], got {pool_x.dtype} {list(pool_x.shape)}")
    if not len(pool_x) == len(pool_y) == len(pool_index):
        raise EightgenError(
            f"pool arrays differ in length: x {len(pool_x)}, y {len(pool_y)}, index {len(pool_index)}"
        )
    mean_c, std_c = _channel_stats(mean, channels, "mean"), _channel_stats(std, channels, "std")
    meta, pool_rows = start_table(cfg, pool_y, pool_index)
    meta, pool_rows = meta.iloc[rows].reset_index(drop=True), pool_rows[rows]
    x0 = torch.empty(len(meta), channels, 28, 28, dtype=torch.float32)
    digit = pool_rows >= 0
    if digit.any():
        pixels = torch.from_numpy(pool_x[pool_rows[digit]].astype(np.float32) / 255.0)
        x0[torch.from_numpy(digit)] = pixels[:, None].expand(-1, channels, -1, -1)
    if not digit.all():
        kind = noise_kind(cfg)
        for i in np.flatnonzero(~digit):
            x0[i] = noise_image(int(meta.seed[i]), kind, channels, mean_c, std_c)
    return Starts(x0=x0, meta=meta)
