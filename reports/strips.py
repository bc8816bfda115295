"""Trajectory pictures for a run report: film strips of sampled starts, the most/least changed galleries, animations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from reports import figures, stats
from reports.formatting import fmt_prob, json_safe
from reports.images import Img, array_img
from reports.runs import Run

MAX_ANIMATIONS = 4
MAX_ANIMATION_FRAMES = 60


def sample_rows(run: Run) -> dict[str, list[int]]:
    """Results rows shown as film strips: up to strips_per_digit per group, sampled with a fixed RNG."""
    chosen: dict[str, list[int]] = {}
    for g in run.order:
        sub = run.results[run.results["group"] == g]
        k = min(run.report.strips_per_digit, len(sub))
        rng = np.random.default_rng(stats.stable_seed(g))
        picked = sub.iloc[np.sort(rng.choice(len(sub), size=k, replace=False))]
        chosen[g] = list(picked.sort_values("seed").index)
    return chosen


def gallery_rows(run: Run) -> tuple[list[int], list[int]]:
    """Most and least changed successful starts by l2_final (gallery_size each)."""
    ok = run.results[stats.as_bool(run.results["success"])]
    ok = ok.assign(_l2=stats.as_float(ok["l2_final"])).sort_values(["_l2", "run_id"], kind="stable")
    k = run.report.gallery_size
    most = list(ok.index[::-1][:k])
    least = list(ok.index[:k])
    return most, least


def animation_rows(run: Run) -> list[int]:
    """A few trajectories to animate: groups spread over the display order, the median-flip success of each."""
    order = run.order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(MAX_ANIMATIONS, len(order)))).astype(int))
    rows = []
    for g in (order[i] for i in picks):
        sub = run.results[run.results["group"] == g]
        flip = stats.as_float(sub["flip_step"])
        ok = stats.as_bool(sub["success"]) & ~np.isnan(flip)
        if ok.any():
            median = np.median(flip[ok])
            rows.append(sub.index[ok][np.argmin(np.abs(flip[ok] - median))])
        else:
            rows.append(sub.index[np.argmax(stats.as_float(sub["p_target_final"]))])
    return rows


def _start_label(run: Run, row: pd.Series) -> str:
    """A start as text: "noise", "digit 3" (MNIST), "Dress" (Fashion-MNIST)."""
    return figures.group_tick(row["group"], run.record.config.dataset.classes)


def _plain(row: pd.Series) -> dict:
    """A results row with plain Python values (None for missing) for the templates."""
    return {k: json_safe(v) for k, v in row.items()}


def _frames(run: Run, snaps: np.ndarray, traj_row: int, indices: Sequence[int], plabel: str, who: str) -> list[dict]:
    out = []
    for k in indices:
        step = int(run.snapshot_steps[k])
        p = float(run.p_target[traj_row, step]) if step < run.p_target.shape[1] else float("nan")
        img = array_img(figures.grey_uint8(snaps[k]), f"{who}, step {step}, {plabel} = {fmt_prob(p)}")
        out.append({"img": img, "step": step, "p": fmt_prob(p), "flipped": p > 0.5})
    return out


def _heat(delta: np.ndarray, who: str, what: str) -> tuple[Img, float]:
    d = delta.mean(axis=0) if delta.ndim == 3 else delta
    vmax = float(np.abs(d).max())
    img = array_img(figures.diverging_rgb(d, vmax), f"{who}: {what} as a heat map, symmetric scale ±{vmax:.2g}")
    return img, vmax


def film_strips(run: Run, chosen: dict[str, list[int]], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    """Per group, a film strip of each chosen start: frames with the target probability, and the final perturbation."""
    k = len(run.snapshot_steps)
    indices = np.unique(np.round(np.linspace(0, k - 1, min(run.report.frames_per_strip, k))).astype(int))
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    groups = []
    for g, rows in chosen.items():
        strips = []
        for i in rows:
            row = run.results.loc[i]
            traj = int(row["traj_row"])
            who = f"{_start_label(run, row)}, seed {row['seed']}"
            frames = _frames(run, snaps[traj], traj, indices, plabel, who)
            heat, vmax = _heat(snaps[traj][-1] - snaps[traj][step0], who, "final perturbation x_final - x0")
            strips.append({"who": who, "run_id": str(row["run_id"]), "row": _plain(row), "frames": frames, "heat": heat, "vmax": vmax})
        groups.append({"group": g, "title": figures.group_title(g, run.record.config.dataset.classes), "strips": strips})
    return groups


def gallery(run: Run, rows: list[int], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    """Start image, final image and perturbation heat map of each given results row."""
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    items = []
    for i in rows:
        row = run.results.loc[i]
        traj = int(row["traj_row"])
        s = snaps[traj]
        who = f"{_start_label(run, row)}, seed {row['seed']}"
        heat, vmax = _heat(s[-1] - s[step0], who, "perturbation")
        items.append(
            {
                "row": _plain(row),
                "who": who,
                "start": array_img(figures.grey_uint8(s[step0]), f"{who}: start image"),
                "final": array_img(figures.grey_uint8(s[-1]), f"{who}: final image, {plabel} = {fmt_prob(row['p_target_final'])}"),
                "heat": heat,
                "vmax": vmax,
            }
        )
    return items


def animations(run: Run, rows: list[int], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    """An animation of each given results row: frames and change heat maps, with the data the page script plays."""
    k = len(run.snapshot_steps)
    indices = np.unique(np.round(np.linspace(0, k - 1, min(k, MAX_ANIMATION_FRAMES))).astype(int))
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    out = []
    for n, i in enumerate(rows):
        row = run.results.loc[i]
        traj = int(row["traj_row"])
        s = snaps[traj]
        who = f"{_start_label(run, row)}, seed {row['seed']}"
        deltas = (s - s[step0]).mean(axis=1)
        vmax = float(np.abs(deltas).max())
        frames = _frames(run, s, traj, indices, plabel, who)
        heats = [
            array_img(figures.diverging_rgb(deltas[k_], vmax), f"{who}: change x_t - x0 at step {run.snapshot_steps[k_]}, scale ±{vmax:.2g}")
            for k_ in indices
        ]
        out.append(
            {
                "id": f"anim-{n}",
                "who": who,
                "row": _plain(row),
                "vmax": vmax,
                "first": frames[0]["img"],
                "first_heat": heats[0],
                "data": {
                    "who": who,
                    "frames": [f["img"].src for f in frames],
                    "heats": [h.src for h in heats],
                    "steps": [f["step"] for f in frames],
                    "p": [f["p"] for f in frames],
                },
            }
        )
    return out
