"""The start grid: which starts a run has (noise seeds, then pool images per start digit), without making any image."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from eightgen.config import AttackConfig
from eightgen.errors import EightgenError

META_COLUMNS = ("run_id", "start_kind", "start_digit", "source_index", "seed")


def digit_counts(cfg: AttackConfig, pool_counts: Mapping[int, int]) -> dict[int, int]:
    """Starts per start digit: per_digit of each, or the digit's whole pool for 'all'; error if the pool is short."""
    if cfg.start_digits is None:
        raise EightgenError("the start classes are unresolved: give start_digits, or the attack within its experiment's config")
    out = {}
    for d in cfg.start_digits:
        have = int(pool_counts.get(d, 0))
        want = have if cfg.per_digit == "all" else cfg.per_digit
        if have < want:
            field = "starts_per_digit" if cfg.starts_per_digit is not None else "seeds"
            raise EightgenError(f"the pool holds {have} images of digit {d}, fewer than {field}={want}")
        out[d] = want
    return out


def n_starts(cfg: AttackConfig, pool_counts: Mapping[int, int]) -> int:
    """How many starts an attack config asks for, given the pool's images per digit."""
    return int(cfg.include_noise) * cfg.seeds + sum(digit_counts(cfg, pool_counts).values())


def start_table(cfg: AttackConfig, pool_y: np.ndarray, pool_index: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Every start's metadata row (noise seeds, then each start digit's first pool images) and its pool row (-1: noise)."""
    pool_y = np.asarray(pool_y)
    counts = digit_counts(cfg, {int(d): int(n) for d, n in enumerate(np.bincount(pool_y, minlength=10))})
    n_noise = cfg.seeds if cfg.include_noise else 0
    seeds = [np.arange(n_noise)]
    digits, pool_rows, ids = [np.full(n_noise, -1)], [np.full(n_noise, -1)], [f"noise-s{s:04d}" for s in range(n_noise)]
    for d, k in counts.items():
        seeds.append(np.arange(k))
        digits.append(np.full(k, d))
        pool_rows.append(np.flatnonzero(pool_y == d)[:k])
        ids.extend(f"d{d}-s{s:04d}" for s in range(k))
    digit, rows = np.concatenate(digits), np.concatenate(pool_rows)
    source = np.where(rows >= 0, np.asarray(pool_index)[np.maximum(rows, 0)] if len(pool_index) else -1, -1)
    meta = pd.DataFrame(
        {
            "run_id": ids,
            "start_kind": np.where(digit >= 0, "digit", "noise"),
            "start_digit": pd.array(np.where(digit >= 0, digit, 0), dtype="Int64"),
            "source_index": pd.array(source, dtype="Int64"),
            "seed": np.concatenate(seeds).astype(np.int64),
        }
    )
    meta.loc[digit < 0, ["start_digit", "source_index"]] = pd.NA
    return meta, rows
