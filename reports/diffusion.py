"""The "three ways" report: gradient of the standard detector, gradient of the robust one, and guided diffusion,
from identical starts, judged by the same referees."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from eightgen.artifacts import write_text_atomically
from eightgen.classes import MNIST, ClassSet
from reports import figures, stats
from reports.files import DIFFUSION_HTML, DIFFUSION_JSON
from reports.formatting import fmt_ci, fmt_num, plain_json
from reports.images import array_img, figure_img
from reports.render import environment

PATHS = ("standard-gradient", "robust-gradient", "diffusion-standard", "diffusion-robust", "diffusion-none")
PATH_LABELS = {
    "standard-gradient": "standard gradient",
    "robust-gradient": "robust gradient",
    "diffusion-standard": "diffusion + standard guidance",
    "diffusion-robust": "diffusion + robust guidance",
    "diffusion-none": "diffusion, unguided",
}
PATH_COLOURS = {
    "standard-gradient": "#0072B2",
    "robust-gradient": "#D55E00",
    "diffusion-standard": "#56B4E9",
    "diffusion-robust": "#009E73",
    "diffusion-none": "#7F7F7F",
}
KINDS = ("noise", "digit")
KNN_GUIDED_MIN = 0.90  # robust-guided diffusion from noise: k-NN (ten classes) target share
UNGUIDED_SHARE = 0.10  # unguided diffusion: about one class in ten
CLASS_SHARE = (0.05, 0.15)  # unguided diffusion: every class's share, by the robust referee, inside these bounds
# The judges' real-image check: a judge may hold the one-in-ten target when, on real images after a denoiser round
# trip, it calls at least this share of the target images the target and at most that share of the others.
CHECK_RECALL_MIN = 0.85
CHECK_FALSE_MAX = 0.05
JUDGE_LABELS = {"knn": "k-NN (ten classes)", "robust": "robust referee", "cnn": "standard referee"}
JUDGE_ORDER = ("knn", "robust", "cnn")  # the first that passes the real-image check judges the one-in-ten check


def _median(values: pd.Series) -> float:
    v = stats.as_float(values)
    return float(np.nanmedian(v)) if np.isfinite(v).any() else math.nan


def summarise(results: pd.DataFrame, measures: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict]:
    """Per path and start kind: each referee's target share (95% intervals), Fréchet distance, diversity, L2 from the start."""
    cells = []
    for path in [p for p in PATHS if p in set(results["path"])]:
        for kind in KINDS:
            rows = results[(results["path"] == path) & (results["start_kind"] == kind)]
            if rows.empty:
                continue
            m = measures.get(path, {}).get(kind, {})
            cells.append(
                {
                    "path": path,
                    "label": PATH_LABELS[path],
                    "kind": kind,
                    "n": int(len(rows)),
                    "knn10": stats.share_ci(rows["knn10_is_target"]),
                    "knn2": stats.share_ci(rows["knn2_is_target"]) if kind == "digit" else None,
                    "robust": stats.share_ci(rows["robust_is_target"]),
                    "frechet": float(m.get("frechet", math.nan)),
                    "diversity": float(m.get("diversity", math.nan)),
                    "l2_median": _median(rows["l2_from_start"]) if kind == "digit" else math.nan,
                }
            )
    return cells


def cell_of(cells: Sequence[dict], path: str, kind: str) -> dict | None:
    """The summary of one path and start kind."""
    return next((c for c in cells if c["path"] == path and c["kind"] == kind), None)


def sanity_cell(judged: pd.DataFrame | None, target: int = 8) -> dict | None:
    """The unguided sanity samples (many noise seeds): each judge's target share and share of every class (95% intervals)."""
    if judged is None or judged.empty:
        return None
    classes = {j: np.asarray(judged[f"{j}_class"], dtype=np.int64) for j in JUDGE_ORDER if f"{j}_class" in judged}
    return {
        "n": int(len(judged)),
        "knn10": stats.share_ci(judged["knn10_is_target"]),
        "robust": stats.share_ci(judged["robust_is_target"]),
        "classes": np.bincount(np.asarray(judged["robust_pred"], dtype=np.int64), minlength=10).tolist(),
        "targets": {j: stats.share_ci(c == target) for j, c in classes.items()},
        "class_shares": {j: [stats.share_ci(c == k) for k in range(10)] for j, c in classes.items()},
    }


def judge_check(check: Mapping | None, target: int) -> dict | None:
    """The judges on real held-out images (as they are, blurred, after a round trip): per-class recall, what they call
    the real target images, the share of other images they call the target; which judge holds the one-in-ten target.

    The first judge of JUDGE_ORDER that passes the round-trip check holds it; the k-NN vote when none passes."""
    if check is None:
        return None
    y = np.asarray(check["y"], dtype=np.int64)
    variants = {}
    for variant, calls in check["calls"].items():
        variants[variant] = {}
        for judge, pred in calls.items():
            pred = np.asarray(pred, dtype=np.int64)
            called = np.bincount(pred[y == target] + 1, minlength=11)  # slot 0: no majority
            variants[variant][judge] = {
                "recall": [stats.share_ci(pred[y == c] == c) for c in range(10)],
                "target_called": {"none": int(called[0]), "classes": called[1:].tolist()},
                "false_target": stats.share_ci(pred[y != target] == target),
            }
    trip = variants["round trip"]
    passes = {j: stats.at_least(r["recall"][target], CHECK_RECALL_MIN) and stats.at_most(r["false_target"], CHECK_FALSE_MAX) for j, r in trip.items()}
    judge = next((j for j in JUDGE_ORDER if passes.get(j, False)), "knn")
    return {
        "level": check["level"], "blur": check["blur"], "per_class": int(np.bincount(y).min()), "images": check["images"],
        "variants": variants, "passes": passes, "judge": judge, "recall_min": CHECK_RECALL_MIN, "false_max": CHECK_FALSE_MAX,
    }


def targets(cells: Sequence[dict], sanity: dict | None = None, judge: str = "knn") -> list[dict]:
    """The experiment's targets (noise starts), each with its value, threshold, margin and whether it is met.

    Shares are judged on their exact 95% interval: "≥ t" on the lower bound. The one-in-ten check of unguided samples
    uses the sanity samples (many noise seeds) when there are some, and the judge that passed the real-image check."""
    guided, unguided, gradient = (cell_of(cells, p, "noise") for p in ("diffusion-robust", "diffusion-none", "robust-gradient"))
    out = []
    if guided is not None:
        out.append(stats.judged("knn_guided", "k-NN (ten classes) calls robust-guided diffusion from noise the target", guided["knn10"], ">=", KNN_GUIDED_MIN))
    if guided is not None and gradient is not None:
        v, ref = guided["frechet"], gradient["frechet"]
        out.append({"key": "frechet_guided", "what": "Fréchet distance of robust-guided diffusion ≤ the robust gradient path's (noise starts)",
                    "value": v, "op": "<=", "threshold": ref, "margin": ref - v, "unit": "distance"})
    if sanity is not None or unguided is not None:
        judged_by_it = bool(sanity) and judge in sanity.get("targets", {})  # else the k-NN vote of the cells
        k, n = sanity["targets"][judge] if judged_by_it else (sanity or unguided)["knn10"], (sanity or unguided)["n"]
        judge = judge if judged_by_it else "knn"
        out.append({"key": "unguided_tenth", "what": f"unguided diffusion from {n} noise starts: the 95% interval of its {JUDGE_LABELS[judge]} target share holds 1 in 10",
                    "value": k["share"], "op": "in", "threshold": UNGUIDED_SHARE, "lo": k["lo"], "hi": k["hi"], "k": k["k"], "n": k["n"],
                    "margin": min(UNGUIDED_SHARE - k["lo"], k["hi"] - UNGUIDED_SHARE), "unit": "share", "judge": judge})
    if sanity is not None and judge in sanity.get("class_shares", {}):
        lo_t, hi_t = CLASS_SHARE
        shares = sanity["class_shares"][judge]
        worst = min(range(10), key=lambda c: min(shares[c]["lo"] - lo_t, hi_t - shares[c]["hi"]))
        k = shares[worst]
        out.append({"key": "unguided_classes", "what": f"unguided diffusion from {sanity['n']} noise starts: the 95% interval of every class's {JUDGE_LABELS[judge]} share lies in 5–15% (the farthest out: class {worst})",
                    "value": k["share"], "op": "within", "threshold": lo_t, "threshold_hi": hi_t, "lo": k["lo"], "hi": k["hi"], "k": k["k"], "n": k["n"],
                    "margin": min(k["lo"] - lo_t, hi_t - k["hi"]), "unit": "share", "judge": judge})
    for t in out:
        t["met"] = bool(np.isfinite(t["margin"]) and t["margin"] >= 0)
    return out


def answer(cells: Sequence[dict], classes: ClassSet, target: int) -> str:
    """The question answered in plain sentences from the noise-start numbers."""
    a = classes.with_article(target)
    parts = []
    for path in PATHS:
        c = cell_of(cells, path, "noise")
        if c is not None:
            parts.append(f"{PATH_LABELS[path]} {fmt_ci(c['knn10'])}, Fréchet {fmt_num(c['frechet'], 1)}")
    said = f"From the same noise starts, the share of results the ten-class k-NN vote calls {a}: " + "; ".join(parts) + ". "
    g, r = cell_of(cells, "diffusion-robust", "noise"), cell_of(cells, "robust-gradient", "noise")
    if g is not None and r is not None:
        if stats.at_least(g["knn10"], 0.5) and g["frechet"] <= r["frechet"]:
            said += (f"A denoiser that knows what {classes.nouns} look like, steered by the robust detector, draws {a} that is closer "
                     "to real ones than what the robust gradient alone reaches; the standard detector's gradient only fools it.")
        else:
            said += "Guided diffusion does not yet beat the robust gradient on these numbers."
    return said


# ---------------------------------------------------------------- figures and images


@figures.styled
def p_target_figure(trajectories: Mapping[str, Mapping[str, np.ndarray]], target_name: str, noun: str = "digit") -> Figure:
    """Median robust-detector p(target) of x̂₀ per DDIM step (10–90% band), per diffusion path, noise and class starts."""
    fig = Figure(figsize=(9.0, 2.8), layout="constrained")
    axes = fig.subplots(1, len(KINDS), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for path, by_kind in trajectories.items():
            p = by_kind.get(kind)
            if p is None or not len(p):
                continue
            cols = np.flatnonzero(np.isfinite(p).any(axis=0))
            q = np.nanquantile(p[:, cols], [0.1, 0.5, 0.9], axis=0)
            ax.plot(cols, q[1], color=PATH_COLOURS[path], lw=1.6, label=PATH_LABELS[path])
            ax.fill_between(cols, q[0], q[2], color=PATH_COLOURS[path], alpha=0.15, lw=0)
        ax.set_title("noise starts" if kind == "noise" else f"{noun} starts (partially noised)")
        ax.set_xlabel("DDIM step")
    axes[0].set_ylabel(f"robust detector p({target_name}) of x̂₀")
    axes[0].set_ylim(-0.02, 1.02)
    axes[-1].legend(loc="lower right")
    return fig


def _verdict(row: pd.Series, target_name: str) -> str:
    return f"k {target_name if bool(row['knn10_is_target']) else 'other'} · r {int(row['robust_pred'])}"


def image_grid(results: pd.DataFrame, images: Mapping[str, np.ndarray], x0: np.ndarray, run_ids: np.ndarray,
               grid_seeds: int, classes: ClassSet, target: int) -> list[dict]:
    """Per start group: the first grid_seeds seeds, the start and every path's final image with its verdicts."""
    first = results[results["path"] == results["path"].iloc[0]]
    groups = stats.group_labels(first)
    index = {r: i for i, r in enumerate(run_ids)}
    name = classes.name_of(target)
    by_path = {p: results[results["path"] == p].set_index("run_id") for p in images}
    out = []
    for g in stats.group_order(groups):
        rows = []
        for _, row in first[groups == g].sort_values("seed").head(grid_seeds).iterrows():
            run_id = row["run_id"]
            i = index[run_id]
            who = f"{'noise' if g == stats.NOISE else classes.label(g)}, seed {int(row['seed'])}"
            cells = []
            for p in PATHS:
                if p not in images:
                    continue
                judged = by_path[p].loc[run_id]
                verdict = _verdict(judged, name)
                img = array_img(figures.grey_uint8(images[p][i]), f"{who}: {PATH_LABELS[p]}; k-NN and robust referee say {verdict}")
                cells.append({"path": p, "img": img, "verdict": verdict, "hit": bool(judged["knn10_is_target"])})
            rows.append({"who": who, "start": array_img(figures.grey_uint8(x0[i]), f"{who}: start image"), "cells": cells})
        out.append({"group": g, "title": figures.group_title(g, classes), "rows": rows})
    return out


def strips(trajectories: Mapping[str, dict], run_ids: Sequence[str], target_name: str) -> list[dict]:
    """For a few starts, the x̂₀ snapshots of every diffusion path, each frame with its step and p(target)."""
    out = []
    for run_id in run_ids:
        paths = []
        for path, t in trajectories.items():
            where = np.flatnonzero(np.asarray(t["run_id"]) == run_id)
            if not len(where):
                continue
            i = int(where[0])
            frames = []
            for j, step in enumerate(t["snapshot_steps"]):
                snap = t["snapshots"][i, j].astype(np.float32)
                if not np.isfinite(snap).all():
                    continue
                p = float(t["p_target"][i, step])
                frames.append({"img": array_img(figures.grey_uint8(snap), f"{run_id}, {PATH_LABELS[path]}: x̂₀ at step {step}, p({target_name}) {p:.2f}"),
                               "step": int(step), "p": p})
            paths.append({"path": path, "label": PATH_LABELS[path], "frames": frames})
        out.append({"run_id": run_id, "paths": paths})
    return out


def render_diffusion(
    out_dir: Path,
    *,
    results: pd.DataFrame,
    measures: Mapping[str, Mapping[str, Mapping[str, float]]],
    images: Mapping[str, np.ndarray],
    x0: np.ndarray,
    run_ids: np.ndarray,
    trajectories: Mapping[str, dict],
    facts: dict,
    target: int,
    classes: ClassSet = MNIST,
    grid_seeds: int = 2,
    sanity: pd.DataFrame | None = None,
    frechet: Mapping | None = None,
    check: Mapping | None = None,
) -> dict:
    """Write diffusion.html and diffusion.json into out_dir; return the summary."""
    cells = summarise(results, measures)
    checked = sanity_cell(sanity, target)
    judges = judge_check(check, target)
    ts = targets(cells, checked, judges["judge"] if judges else "knn")
    name = classes.name_of(target)
    summary = {"target": target, "target_name": name, "cells": cells, "sanity": checked, "frechet": dict(frechet) if frechet else None,
               "judge_check": judges, "targets": ts,
               "targets_met": bool(ts) and all(t["met"] for t in ts), "answer": answer(cells, classes, target), "facts": facts}
    by_kind = {}
    for path, t in trajectories.items():
        kinds = np.asarray(t["start_kind"]).astype(str)
        by_kind[path] = {k: t["p_target"][kinds == k] for k in KINDS}
    fig = figure_img(
        p_target_figure(by_kind, name, classes.noun),
        f"Median robust-detector p({name}) of the denoised estimate per DDIM step, per diffusion path, for noise and {classes.noun} starts.",
        "Line: median over starts; band: 10th to 90th percentile. p is the robust detector's, on x̂₀ after the step's guidance, on every path.",
        "fig-diffusion-p",
    )
    shown_ids = [r for r in run_ids if str(r).startswith("noise")][:2] + [r for r in run_ids if not str(r).startswith("noise")][:2]
    context = {
        "title": f"eightgen: three ways to {classes.with_article(target)}",
        "summary": summary,
        "labels": PATH_LABELS,
        "figure": fig,
        "grid": image_grid(results, images, x0, run_ids, grid_seeds, classes, target),
        "grid_paths": [p for p in PATHS if p in images],
        "strips": strips(trajectories, shown_ids, name),
        "judge_labels": JUDGE_LABELS,
        "check_images": {v: [array_img(figures.grey_uint8(x[c]), f"a real {classes.label(c)}, {v}") for c in range(len(x))]
                         for v, x in (check or {}).get("examples", {}).items()},
        "classes": classes,
    }
    html = environment().get_template("diffusion.html.j2").render(**context)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / DIFFUSION_HTML, html)
    write_text_atomically(out_dir / DIFFUSION_JSON, json.dumps(plain_json(summary), indent=2) + "\n")
    return summary
