"""A synthetic run directory that follows the run-directory contract exactly, for report tests and timing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from eightgen.config import NOT_TARGET_DIGITS, AttackConfig, ExperimentConfig, ReportConfig, TrainConfig
from eightgen.rundir import RunRecord, write_run
from eightgen.trajectory import Trajectory, save_trajectory

# Seven-segment strokes on the 28x28 grid: (rows, cols) slices of each segment.
_SEGMENTS = {
    "a": (slice(4, 7), slice(8, 20)),
    "b": (slice(4, 14), slice(17, 20)),
    "c": (slice(13, 24), slice(17, 20)),
    "d": (slice(21, 24), slice(8, 20)),
    "e": (slice(13, 24), slice(8, 11)),
    "f": (slice(4, 14), slice(8, 11)),
    "g": (slice(12, 15), slice(8, 20)),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
# Mean final logit margin per start digit (how easy the synthetic detector is to fool), noise last.
_EASE = {0: 2.0, 1: -1.5, 2: 2.5, 3: 3.0, 4: 0.5, 5: 2.0, 6: 1.0, 7: 0.0, 8: 6.0, 9: 3.5, None: 1.0}


def glyph(digit: int) -> np.ndarray:
    """A blurred seven-segment digit, float32 [28, 28] in [0, 1]."""
    img = np.zeros((28, 28), np.float32)
    for seg in _DIGIT_SEGMENTS[digit]:
        img[_SEGMENTS[seg]] = 1.0
    padded = np.pad(img, 1)
    blurred = sum(padded[i : i + 28, j : j + 28] for i in range(3) for j in range(3)) / 9.0
    return np.clip(0.35 * img + 0.75 * blurred, 0.0, 1.0)


def _starts(digits: tuple[int, ...], seeds: int, include_noise: bool) -> pd.DataFrame:
    kinds = ([(None, s) for s in range(seeds)] if include_noise else []) + [(d, s) for d in digits for s in range(seeds)]
    return pd.DataFrame(
        {
            "run_id": [f"noise-s{s:04d}" if d is None else f"d{d}-s{s:04d}" for d, s in kinds],
            "start_kind": ["noise" if d is None else "digit" for d, _ in kinds],
            "start_digit": pd.array([d for d, _ in kinds], dtype="Int64"),
            "source_index": pd.array([None if d is None else 1000 * d + 7 * s for d, s in kinds], dtype="Int64"),
            "seed": np.array([s for _, s in kinds], dtype=np.int64),
        }
    )


def _first_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along axis 1, -1 where none."""
    first = mask.argmax(axis=1)
    return np.where(mask.any(axis=1), first, -1)


def make_run_dir(
    root: Path,
    name: str = "fixture",
    *,
    run_name: str | None = None,
    seeds: int = 6,
    digits: tuple[int, ...] = NOT_TARGET_DIGITS,
    include_noise: bool = True,
    steps: int = 50,
    record_every: int = 5,
    channels: int = 1,
    method: str = "seed",
    dead_unit_share: float = 0.1,
    shards: int = 1,
    rng_seed: int = 0,
) -> Path:
    """Write root/name/{config.json, results.parquet, results.csv, trajectories/} of a synthetic run; return the dir."""
    rng = np.random.default_rng(rng_seed)
    run_dir = Path(root) / name
    meta = _starts(tuple(digits), seeds, include_noise)
    n, target = len(meta), 8
    digit = meta["start_digit"].to_numpy(dtype=float, na_value=np.nan)
    noise = np.isnan(digit)

    # Starts: shifted, dimmed seven-segment digits; noise is the model-input randn of method "seed".
    glyphs = np.stack([glyph(d) for d in range(10)])
    x0 = np.empty((n, channels, 28, 28), np.float32)
    shifts = rng.integers(-2, 3, size=(n, 2))
    gain = rng.uniform(0.75, 1.0, size=n).astype(np.float32)
    for i in range(n):
        if noise[i]:
            x0[i] = rng.standard_normal((channels, 28, 28)) if method == "seed" else rng.uniform(size=(channels, 28, 28))
        else:
            g = np.roll(glyphs[int(digit[i])], tuple(shifts[i]), axis=(0, 1)) * gain[i]
            x0[i] = np.clip(g + rng.normal(0, 0.02, (28, 28)), 0, 1)[None]
    # Perturbation direction: a little of the target glyph plus structured high-frequency noise.
    toward = glyphs[target][None, None] - x0
    delta = rng.uniform(0.08, 0.3, (n, 1, 1, 1)).astype(np.float32) * toward
    delta += rng.normal(0, 0.06, (n, channels, 28, 28)).astype(np.float32)

    # Logit margin of class "8" along the run: saturating approach to a per-start end value, plus jitter.
    t = np.arange(steps + 1)
    tau = np.exp(rng.normal(np.log(12), 0.4, n))
    s = (1 - np.exp(-t[None] / tau[:, None])) / (1 - np.exp(-steps / tau[:, None]))
    ease = np.array([_EASE[None if np.isnan(d) else int(d)] for d in digit])
    m0 = np.where(noise, rng.normal(-2, 1, n), rng.normal(-10, 3, n))
    m_end = rng.normal(ease, 3.0)
    margin = m0[:, None] + (m_end - m0)[:, None] * s
    margin[:, 1:] += rng.normal(0, 0.2, (n, steps))
    logits = np.stack([np.zeros_like(margin), margin], axis=-1).astype(np.float32)
    p = (1 / (1 + np.exp(-margin))).astype(np.float32)
    loss = (2 * (1 - p)).astype(np.float32)

    def x_at(step_frac: np.ndarray) -> np.ndarray:
        x = x0 + step_frac.reshape(-1, 1, 1, 1).astype(np.float32) * delta
        return np.clip(x, 0, 1) if method.startswith("pgd") else x

    snapshot_steps = np.unique(np.r_[np.arange(0, steps + 1, record_every), steps]).astype(np.int32)
    snapshots = np.stack([x_at(s[:, k]) for k in snapshot_steps], axis=1).astype(np.float16)
    pos = margin > 0
    flip_step = _first_true(pos).astype(np.int32)
    flipped = flip_step >= 0
    flip_x = np.where(flipped[:, None, None, None], x_at(s[np.arange(n), np.maximum(flip_step, 0)]), 0).astype(np.float32)
    x_final = x_at(s[:, steps]).astype(np.float32)
    success = pos[:, steps]
    grad = np.exp(rng.normal(-2, 1, n)).astype(np.float32)
    grad[success & (rng.uniform(size=n) < dead_unit_share)] = 0.0

    after_flip = t[None] >= np.where(flipped, flip_step, steps + 1)[:, None]
    leaves = pos[:, :-1] & ~pos[:, 1:] & after_flip[:, 1:]
    n_reflips = leaves.sum(axis=1)
    diff = (x_final - x0).reshape(n, -1)
    l2_at_flip = np.where(flipped, np.linalg.norm((flip_x - x0).reshape(n, -1), axis=1), np.nan).astype(np.float32)

    def int_or_na(values: np.ndarray) -> pd.arrays.IntegerArray:
        return pd.array([None if v < 0 else int(v) for v in values], dtype="Int64")

    results = meta.assign(
        model="small_cnn",
        method=method,
        target=target,
        steps=steps,
        steps_run=steps,
        p_target_start=p[:, 0].astype(np.float64),
        p_target_final=p[:, steps].astype(np.float64),
        success=success,
        flip_step=int_or_na(flip_step),
        stays_flipped=flipped & (n_reflips == 0),
        n_reflips=n_reflips.astype(np.int64),
        step_p50=int_or_na(_first_true(p >= 0.5)),
        step_p90=int_or_na(_first_true(p >= 0.9)),
        censored=~flipped,
        early_stopped=np.zeros(n, bool),
        stopped_step=pd.array([None] * n, dtype="Int64"),
        l2_final=np.linalg.norm(diff, axis=1),
        l2_at_flip=l2_at_flip.astype(np.float64),
        linf_final=np.abs(diff).max(axis=1),
        loss_start=loss[:, 0].astype(np.float64),
        loss_final=loss[:, steps].astype(np.float64),
        grad_norm_final=grad.astype(np.float64),
        frac_outside_01=((x_final < 0) | (x_final > 1)).reshape(n, -1).mean(axis=1),
        grad_zero_final=grad == 0,
        saturated_start=(p[:, 0] < 1e-6) | (p[:, 0] > 1 - 1e-6),
        collapse_final=pd.array(grad == 0, dtype="boolean"),  # the simulated dead-unit starts are collapsed
    )
    trajectory = Trajectory(
        snapshot_steps=snapshot_steps,
        snapshots=snapshots,
        p_target=p,
        loss=loss,
        logits=logits,
        flip_step=flip_step,
        flip_snapshot=flip_x.astype(np.float16),
        l2_at_flip=l2_at_flip,
        x_final=x_final,
        grad_norm_final=grad,
        stopped_step=np.full(n, -1, np.int32),
    )
    record = _record(run_name or name, method, digits, include_noise, seeds, steps, record_every, channels, rng)
    write_sharded(run_dir, record, results, trajectory, meta["run_id"].to_numpy(dtype=str), shards)
    return run_dir


def write_sharded(run_dir: Path, record: RunRecord, results: pd.DataFrame, traj: Trajectory, run_ids: np.ndarray, shards: int = 1) -> None:
    """Write a run directory whose trajectories are split into `shards` files of consecutive starts."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, rows in enumerate(np.array_split(np.arange(traj.n), shards)):
            paths.append(save_trajectory(traj.rows(rows), run_ids[rows], Path(tmp) / f"{i}.npz"))
        write_run(run_dir, record, results, paths)


def _record(run_name: str, method: str, digits, include_noise, seeds, steps, record_every, channels, rng) -> RunRecord:
    exp = ExperimentConfig(
        name="fixture",
        train=TrainConfig(arch="small_cnn", channels=channels, epochs=2),
        attack=AttackConfig(
            start_digits=tuple(digits),
            include_noise=include_noise,
            seeds=seeds,
            steps=steps,
            method=method,
            record_every=record_every,
            eps=0.3 if method.startswith("pgd") else None,
        ),
        report=ReportConfig(title=f"eightgen report: {run_name}", strips_per_digit=2, frames_per_strip=6, gallery_size=6),
        run_name=run_name,
    )
    counts = {
        "train": {str(d): int(4800 + 40 * d) for d in range(10)},
        "valid": {str(d): int(850 + 7 * d) for d in range(10)},
        "pool": {str(d): 64 for d in range(10)},
    }
    err = {str(d): float(rng.uniform(0.002, 0.03)) for d in range(10)}
    wrong = {d: round(counts["valid"][d] * err[d]) for d in err}
    err = {d: wrong[d] / counts["valid"][d] for d in err}
    n_valid = sum(counts["valid"].values())
    n8 = counts["valid"]["8"]
    fp = sum(w for d, w in wrong.items() if d != "8")
    confusion = [[n_valid - n8 - fp, fp], [wrong["8"], n8 - wrong["8"]]]
    return RunRecord.model_validate({
        "run_name": run_name,
        "created": "2025-01-01T12:00:00+00:00",
        "version": "0.1.0",
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "config": exp,
        "dataset": {
            "path": ".eightgen-cache/dataset/abc",
            "sha256": "a" * 64,
            "manifest": {
                "source": "MNIST IDX files (train + test)",
                "target": 8,
                "counts": counts,
                "balance": "none",
                "seed": 0,
            },
        },
        "model": {
            "path": ".eightgen-cache/model/def",
            "sha256": "b" * 64,
            "spec": {
                "arch": "small_cnn",
                "channels": channels,
                "normalize": "none",
                "mean": [0.0] * channels,
                "std": [1.0] * channels,
                "target": 8,
                "class_names": ["not_8", "8"],
            },
            "metrics": {
                "valid_error": sum(wrong.values()) / n_valid,
                "confusion": confusion,
                "valid_error_by_digit": err,
                "n_train": sum(counts["train"].values()),
                "n_valid": n_valid,
                "epochs": 2,
                "train_seconds": 41.5,
                "history": [
                    {"epoch": 0, "train_loss": 0.12, "valid_loss": 0.07, "error_rate": 0.021},
                    {"epoch": 1, "train_loss": 0.05, "valid_loss": 0.04, "error_rate": sum(wrong.values()) / n_valid},
                ],
            },
        },
        "device": "cpu",
        "attack_seconds": 12.75,
    })


def rewrite_results(run_dir: Path, results: pd.DataFrame) -> None:
    """Replace a run directory's results table through the run-directory writer (record and trajectories kept)."""
    from eightgen.rundir import load_record, trajectories

    write_run(run_dir, load_record(run_dir), results, trajectories(run_dir).paths)
