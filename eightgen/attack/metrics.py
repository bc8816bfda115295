"""Per-start results computed from a recorded trajectory: success, flip timing, perturbation norms, artefacts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from eightgen.data.grid import META_COLUMNS
from eightgen.errors import EightgenError
from eightgen.trajectory import Trajectory

TARGET = 1  # class index of the target digit
SATURATED = 1e-6  # p_target this close to 0 or 1: the softmax leaves almost no gradient


def first_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis of a [n, T] mask, -1 where there is none."""
    return np.where(mask.any(axis=1), mask.argmax(axis=1), -1)


def _nullable(values: np.ndarray) -> pd.array:
    """An Int64 array with -1 as null."""
    out = pd.array(values.astype(np.int64), dtype="Int64")
    out[values < 0] = pd.NA
    return out


def delta_norms(x_final: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 and L-inf norms of x_final - x0 per start, over every pixel of every channel (pixel units)."""
    d = (x_final.astype(np.float64) - x0.astype(np.float64)).reshape(len(x0), -1)
    return np.sqrt((d * d).sum(axis=1)), np.abs(d).max(axis=1)


def flip_statistics(logits: np.ndarray) -> dict[str, np.ndarray]:
    """From logits [n, T, 2]: flip step, success, whether the flip held, and how often argmax left the target."""
    on = logits.argmax(axis=-1) == TARGET
    flip = first_true(on)
    before_flip = np.arange(on.shape[1])[None, :] < flip[:, None]
    held = (flip >= 0) & (on | before_flip).all(axis=1)
    left = (on[:, :-1] & ~on[:, 1:]).sum(axis=1)
    return {"flip_step": flip, "success": on[:, -1], "stays_flipped": held, "n_reflips": left}


def results_frame(
    traj: Trajectory,
    x0: np.ndarray,
    meta: pd.DataFrame,
    *,
    model_name: str,
    method: str,
    target: int,
    collapse: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per start: what happened to it, measured from the recorded trajectory and final image.

    `collapse` (eightgen.attack.indicators.collapsed at x_final) fills collapse_final; without it that column is null.
    """
    x0 = np.asarray(x0)
    if x0.shape != traj.x_final.shape:
        raise EightgenError(f"starts have shape {list(x0.shape)}, trajectory final images {list(traj.x_final.shape)}")
    if len(meta) != traj.n:
        raise EightgenError(f"{len(meta)} metadata rows for a trajectory of {traj.n} starts")
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise EightgenError(f"start metadata lacks columns {missing}")

    flips = flip_statistics(traj.logits)
    flip = flips["flip_step"]
    p = traj.p_target
    l2_final, linf_final = delta_norms(traj.x_final, x0)
    stopped = traj.stopped_step.astype(np.int64)
    outside = ((traj.x_final < 0) | (traj.x_final > 1)).reshape(traj.n, -1).mean(axis=1)
    p_start = p[:, 0].astype(np.float64)

    frame = meta.loc[:, list(META_COLUMNS)].reset_index(drop=True).copy()
    frame.insert(1, "model", model_name)
    frame.insert(2, "method", method)
    frame = frame.assign(
        target=target,
        steps=traj.steps,
        steps_run=np.where(stopped >= 0, stopped, traj.steps),
        p_target_start=p_start,
        p_target_final=p[:, -1].astype(np.float64),
        success=flips["success"],
        flip_step=_nullable(flip),
        stays_flipped=flips["stays_flipped"],
        n_reflips=flips["n_reflips"].astype(np.int64),
        step_p50=_nullable(first_true(p >= 0.5)),
        step_p90=_nullable(first_true(p >= 0.9)),
        censored=flip < 0,
        early_stopped=stopped >= 0,
        stopped_step=_nullable(stopped),
        l2_final=l2_final,
        l2_at_flip=np.where(flip >= 0, traj.l2_at_flip.astype(np.float64), np.nan),
        linf_final=linf_final,
        loss_start=traj.loss[:, 0].astype(np.float64),
        loss_final=traj.loss[:, -1].astype(np.float64),
        grad_norm_final=traj.grad_norm_final.astype(np.float64),
        frac_outside_01=outside,
        grad_zero_final=traj.grad_norm_final == 0,
        saturated_start=(p_start < SATURATED) | (p_start > 1 - SATURATED),
        collapse_final=_collapse_column(collapse, traj.n),
    )
    return frame


def _collapse_column(collapse: np.ndarray | None, n: int) -> pd.array:
    """A nullable boolean column: dead-unit collapse at x_final per start, null where it was not measured."""
    if collapse is None:
        return pd.array([pd.NA] * n, dtype="boolean")
    collapse = np.asarray(collapse, dtype=bool)
    if collapse.shape != (n,):
        raise EightgenError(f"collapse flags have shape {list(collapse.shape)}, expected [{n}]")
    return pd.array(collapse, dtype="boolean")
