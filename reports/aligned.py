"""The aligned report: does the optimised image become the target (an 8, a Bag)? A standard and a robust detector, judged
by referees."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from eightgen.classes import classes_of
from eightgen.errors import EightgenError
from eightgen.rundir import RunRecord, local_run, trajectories
from reports import figures, stats
from reports.files import ALIGNED_HTML, ALIGNED_JSON
from reports.formatting import fmt_ci, fmt_num, fmt_pct, plain_json
from reports.images import array_img, figure_img
from reports.narrative import warnings_of
from reports.render import environment
from reports.runs import Run, load_run
from reports.sweep import detector_colours, detector_order, is_sweep, sweep_answer, sweep_img, sweep_summary

DETECTORS = ("standard", "robust")
# A detector's name: "standard", "robust" (the targets' robust detector) or "robust<radius>" in a sweep of radii.
DETECTOR_NAME = re.compile(r"standard|robust[0-9.e+-]*")
# Referee key -> (label, verdict column). k-NN: 5 nearest real images among the target and the start class.
REFEREES = {
    "knn": ("k-NN vote", "knn_is_target"),
    "robust": ("robust referee", "ref_robust_is_target"),
    "cnn": ("standard referee", "ref_cnn_is_target"),
}
STILL_START = {"robust": "ref_robust_is_start", "cnn": "ref_cnn_is_start"}
REFEREE_COLUMNS = (
    "knn_is_target", "knn_share_target", "ref_robust_is_target", "ref_robust_p_target", "ref_cnn_is_target", "ref_cnn_p_target"
)
# The targets at the matched budget (digit starts): what the experiment is meant to show.
KNN_ROBUST_MIN = 0.85
KNN_STANDARD_MAX = 0.15
# Judged on the exact interval's lower bound: 108 of 108 flipped starts (the default) show at least 96.6%, so 95% can be met
FLIP_MIN = 0.95
AGREE_MIN = 0.90
# A referee that calls at least this share of untouched noise starts the target says nothing about noise starts.
NOISE_UNINFORMATIVE = 0.10
DETECTOR_COLOURS = {"standard": "#0072B2", "robust": "#D55E00"}


@dataclass
class AlignedRun:
    """One judged (detector, budget) run: its results and the start and final images."""

    path: Path
    detector: str
    budget: float
    run: Run
    results: pd.DataFrame
    x0: np.ndarray  # [n, C, 28, 28] (from the step-0 snapshot)
    x_final: np.ndarray  # [n, C, 28, 28]

    @property
    def record(self) -> RunRecord:
        """The run's record."""
        return self.run.record

    @property
    def radius(self) -> float:
        """The detector's adversarial training radius (0: standard training)."""
        return self.record.config.train.radius


def load_aligned_run(run_dir: Path) -> AlignedRun:
    """A judged run directory written by the aligned flow (config.json with an "aligned" section, referee columns); a
    run in a store is read from this host's copy."""
    run_dir = local_run(run_dir)
    run = load_run(run_dir)  # checks config.json, results.parquet and the trajectory shards
    aligned = run.record.aligned
    if aligned is None or not DETECTOR_NAME.fullmatch(aligned.detector):
        raise EightgenError(f"{run_dir / 'config.json'}: no aligned section (detector, budget); not an aligned run")
    missing = [c for c in REFEREE_COLUMNS if c not in run.results]
    if missing:
        raise EightgenError(f"{run_dir / 'results.parquet'}: no referee columns {', '.join(missing)}")
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    x0, x_final = [], []
    for traj, _ in trajectories(run_dir):  # one shard in memory at a time
        x0.append(traj.snapshots[:, step0].astype(np.float32))
        x_final.append(traj.x_final)
    x0, x_final = np.concatenate(x0), np.concatenate(x_final)
    rows = run.results["traj_row"].to_numpy()
    return AlignedRun(run_dir, aligned.detector, aligned.budget, run, run.results, x0[rows], x_final[rows])


def summarise(results: pd.DataFrame) -> dict:
    """Success, median L2, each referee's target share and the still-start-digit shares (exact 95% intervals) of some starts."""
    success = stats.as_bool(results["success"])
    l2_final, l2_flip = stats.as_float(results["l2_final"]), stats.as_float(results["l2_at_flip"])
    ind = stats.indicators(results)
    return {
        "n": int(len(results)),
        "success": stats.share_ci(success),
        "l2_final_median": float(np.nanmedian(l2_final)) if np.isfinite(l2_final).any() else math.nan,
        "l2_flip_median": float(np.nanmedian(l2_flip)) if np.isfinite(l2_flip).any() else math.nan,
        "referees": {k: stats.share_ci(results[col]) for k, (_, col) in REFEREES.items()},
        "referees_start": {k: stats.share_ci(results[col + "_start"]) for k, (_, col) in REFEREES.items() if col + "_start" in results},
        "still_start": {k: stats.share_ci(results[col]) for k, col in STILL_START.items()},
        "agree_robust_knn": stats.share_ci(stats.as_bool(results["ref_robust_is_target"]) == stats.as_bool(results["knn_is_target"])),
        "collapse_share": stats.share_ci(ind["collapse_final"].to_numpy()),
        "grad_zero_share": stats.share_ci(ind["grad_zero_final"].to_numpy()),
    }


def _is_noise(results: pd.DataFrame) -> np.ndarray:
    return (stats.group_labels(results) == stats.NOISE).to_numpy()


def aligned_summary(runs: Sequence[AlignedRun], matched_budget: float) -> dict:
    """Per detector and budget the digit-start (and noise-start) summaries, the targets and the noise verdict of each referee."""
    cells = []
    for r in sorted(runs, key=lambda r: (r.budget, r.radius)):
        noise = _is_noise(r.results)
        cells.append(
            {
                "detector": r.detector,
                "radius": r.radius,
                "budget": r.budget,
                "run": r.path.name,
                "digits": summarise(r.results[~noise]) if (~noise).any() else None,
                "noise": summarise(r.results[noise]) if noise.any() else None,
            }
        )
    noise_rows = [r.results[_is_noise(r.results)] for r in runs]
    noise_rows = [f for f in noise_rows if len(f)]
    noise_referees = {}
    if noise_rows:
        first = noise_rows[0]  # every run starts from the same noise images
        for k, (_, col) in REFEREES.items():
            share = stats.share_ci(first[col + "_start"]) if col + "_start" in first else stats.share_ci(np.zeros(0, bool))
            # Informative only when its interval shows it calls fewer untouched noise starts the target than the threshold.
            noise_referees[k] = {"start_share": share, "informative": stats.at_most(share, NOISE_UNINFORMATIVE)}
    first = runs[0].run
    classes = first.record.config.dataset.classes
    summary = {
        "dataset": classes.name,
        "target": int(first.target),
        "target_name": classes.name_of(first.target),
        "matched_budget": matched_budget,
        "budgets": sorted({r.budget for r in runs}),
        "cells": cells,
        "noise_referees": noise_referees,
        "noise_uninformative_at": NOISE_UNINFORMATIVE,
    }
    summary["targets"] = targets(summary)
    summary["targets_met"] = all(t["met"] for t in summary["targets"]) if summary["targets"] else False
    summary["answer"] = answer(summary)
    if is_sweep({r.detector for r in runs}):
        summary["sweep"] = sweep_summary(cells, _detector_facts(runs), matched_budget)
        summary["sweep"]["answer"] = sweep_answer(summary["sweep"], summary["target_name"], classes.plural(first.target))
    return summary


def cell(summary: dict, detector: str, budget: float, kind: str = "digits") -> dict | None:
    """The summary of one detector at one budget (digit or noise starts)."""
    for c in summary["cells"]:
        if c["detector"] == detector and c["budget"] == budget:
            return c[kind]
    return None


def targets(summary: dict) -> list[dict]:
    """The experiment's targets at the matched budget (digit starts), each with its value, threshold and margin."""
    b = summary["matched_budget"]
    std, rob = cell(summary, "standard", b), cell(summary, "robust", b)
    if std is None or rob is None:
        return []
    name = summary["target_name"]
    rows = [
        ("knn_robust", f"k-NN calls the robust detector's results {name}", "robust", rob["referees"]["knn"], ">=", KNN_ROBUST_MIN),
        ("knn_standard", f"k-NN calls the standard detector's results {name}", "standard", std["referees"]["knn"], "<=", KNN_STANDARD_MAX),
        ("flip_robust", "the robust detector flips its starts", "robust", rob["success"], ">=", FLIP_MIN),
        ("flip_standard", "the standard detector flips its starts", "standard", std["success"], ">=", FLIP_MIN),
        ("agree_robust", "robust referee agrees with k-NN on the robust detector's results", "robust", rob["agree_robust_knn"], ">=", AGREE_MIN),
    ]
    return [stats.judged(key, what, share, op, threshold) | {"detector": detector} for key, what, detector, share, op, threshold in rows]


def answer(summary: dict) -> str:
    """The experiment's question answered in plain sentences from the matched-budget numbers."""
    b = summary["matched_budget"]
    std, rob = cell(summary, "standard", b), cell(summary, "robust", b)
    if std is None or rob is None:
        return "No answer: the runs lack a standard or a robust detector at the matched budget."
    k_r, k_s = rob["referees"]["knn"], std["referees"]["knn"]
    classes, target = classes_of(summary["dataset"]), summary["target"]
    name, many, noun = classes.name_of(target), classes.plural(target), classes.noun
    said = (
        f"At an L2 budget of {b:g}, the standard detector flips {fmt_ci(std['success'])} and the robust one "
        f"{fmt_ci(rob['success'])} of the held-out {noun} starts. "
        f"{fmt_ci(k_r)} of the robust detector's results lie nearer to real {many} than to real images of their start {noun} "
        f"(5-NN vote), against {fmt_ci(k_s)} of the standard detector's; the robust referee calls "
        f"{fmt_ci(rob['referees']['robust'])} and {fmt_ci(std['referees']['robust'])} of them {name}. "
    )
    # Verdicts on the intervals: "most" means the lower bound is above one half, "few" the upper bound below it.
    if stats.at_least(k_r, 0.5) and k_s["hi"] < 0.5:
        said += (
            f"So yes, but only with the robust detector: its gradient draws {classes.with_article(target)}; the standard "
            f"detector's gradient flips the label while the image stays its start {noun}."
        )
    elif stats.at_least(k_r, 0.5) and stats.at_least(k_s, 0.5):
        said += f"Both detectors' results move toward real {many} at this budget."
    else:
        said += f"At this budget the k-NN vote does not show that most of the robust detector's results look like {many}."
    cnn = std["referees"]["cnn"]
    if cnn["lo"] > 2 * max(k_s["hi"], 0.05):
        said += (
            f" The standard 10-class referee calls {fmt_ci(cnn)} of the standard detector's results {name}: adversarial "
            "perturbations transfer between standard networks, so that referee's verdict is no evidence."
        )
    return said


# ---------------------------------------------------------------- figure


@figures.styled
def budget_figure(summary: dict) -> Figure:
    """Per budget and detector: flip rate, each referee's target share and the still-start share (95% intervals)."""
    classes = classes_of(summary["dataset"])
    name, noun = summary["target_name"], classes.noun
    panels = [
        (f"detector says {name} (flip)", lambda c: c["success"], None),
        (f"k-NN: nearer to real {classes.plural(summary['target'])}", lambda c: c["referees"]["knn"], (KNN_STANDARD_MAX, KNN_ROBUST_MIN)),
        (f"robust referee says {name}", lambda c: c["referees"]["robust"], None),
        (f"standard referee says {name}", lambda c: c["referees"]["cnn"], None),
        (f"robust referee: still start {noun}", lambda c: c["still_start"]["robust"], None),
    ]
    fig = Figure(figsize=(11.0, 2.5), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    order = detector_order(summary)
    colours = detector_colours(order, DETECTOR_COLOURS)
    for ax, (title, pick, lines) in zip(axes, panels):
        for d in order:
            cs = [c for c in summary["cells"] if c["detector"] == d and c["digits"] is not None]
            if not cs:
                continue
            x = np.array([c["budget"] for c in cs])
            v = [pick(c["digits"]) for c in cs]
            y = np.array([s["share"] for s in v])
            err = np.array([[s["share"] - s["lo"] for s in v], [s["hi"] - s["share"] for s in v]])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", ms=3.5, lw=1.4, capsize=2, color=colours[d], label=f"{d} detector")
        for level in lines or ():
            ax.axhline(level, color=figures.REFERENCE, lw=0.8, ls="--")
        ax.axvline(summary["matched_budget"], color=figures.REFERENCE, lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("L2 budget ε")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel(f"share of {noun} starts")
    axes[0].legend(loc="lower right", fontsize=7 if len(order) > 2 else None)
    return fig


# ---------------------------------------------------------------- image grid


def _verdict_text(row: pd.Series, start_digit: int | None, classes, target: int) -> str:
    """Each referee's class under a grid image: k = k-NN vote (target or start), r = robust, c = standard referee."""
    knn = classes.name_of(target) if bool(row["knn_is_target"]) else ("start" if start_digit is None else classes.name_of(start_digit))
    return f"k {knn} · r {classes.name_of(int(row['ref_robust_pred']))} · c {classes.name_of(int(row['ref_cnn_pred']))}"


def image_grid(runs: Sequence[AlignedRun], budgets: Sequence[float], grid_seeds: int, detectors: Sequence[str] = DETECTORS) -> list[dict]:
    """Per start group: rows of start | each detector's result for every budget (the first grid_seeds seeds)."""
    by_key = {(r.detector, r.budget): r for r in runs}
    first = runs[0]
    classes, target = first.record.config.dataset.classes, first.run.target
    groups = stats.group_labels(first.results)
    out = []
    for g in stats.group_order(groups):
        sub = first.results[groups == g].sort_values("seed").head(grid_seeds)
        rows = []
        for _, row in sub.iterrows():
            run_id = row["run_id"]
            i0 = int(np.flatnonzero(first.results["run_id"].to_numpy() == run_id)[0])
            start_digit = None if g == stats.NOISE else int(g)
            who = f"{figures.group_tick(g, classes)}, seed {int(row['seed'])}"
            cells = []
            for b in budgets:
                for d in detectors:
                    r = by_key.get((d, b))
                    if r is None:
                        cells.append(None)
                        continue
                    j = int(np.flatnonzero(r.results["run_id"].to_numpy() == run_id)[0])
                    rr = r.results.iloc[j]
                    verdict = _verdict_text(rr, start_digit, classes, target)
                    flipped = "flipped" if bool(rr["success"]) else "not flipped"
                    img = array_img(figures.grey_uint8(r.x_final[j]), f"{who}: {d} detector at budget {b:g}, {flipped}; referees {verdict}")
                    cells.append({"img": img, "verdict": verdict, "success": bool(rr["success"]), "knn_target": bool(rr["knn_is_target"])})
            rows.append({"who": who, "start": array_img(figures.grey_uint8(first.x0[i0]), f"{who}: start image"), "cells": cells})
        out.append({"group": g, "title": figures.group_title(g, classes), "rows": rows})
    return out


# ---------------------------------------------------------------- facts and rendering


def _detector_facts(runs: Sequence[AlignedRun]) -> list[dict]:
    seen, out = set(), []
    for r in runs:
        if r.detector in seen:
            continue
        seen.add(r.detector)
        model, train = r.record.model, r.record.config.train
        metrics = model.metrics
        robust = metrics.get("robust") or {}
        out.append(
            {
                "detector": r.detector,
                "radius": r.radius,
                "training": "standard" if train.adversarial == "none" else
                f"PGD-{train.adversarial} adversarial, ε {train.adv_eps}, {train.adv_steps} steps",
                "epochs": metrics.get("epochs"),
                "n_train": metrics.get("n_train"),
                "valid_error": metrics.get("valid_error"),
                "n_valid": metrics.get("n_valid"),
                "confusion": metrics.get("confusion"),
                "robust": robust,
                "seconds": metrics.get("train_seconds"),
                "sha": model.sha256[:12],
            }
        )
    return sorted(out, key=lambda f: f["radius"])


def _referee_facts(runs: Sequence[AlignedRun]) -> dict:
    referees = runs[0].record.referees
    return referees.info if referees is not None else {}


def _warnings(runs: Sequence[AlignedRun]) -> list[dict]:
    out = []
    for r in sorted(runs, key=lambda r: (r.radius, r.budget)):
        for w in warnings_of(r.run):
            if w["id"] in ("warn-collapse", "warn-dead-units", "note-dead-units", "note-outside"):
                out.append(dict(w, id=f"{w['id']}-{r.path.name}", text=f"{r.detector} detector, budget {r.budget:g}: {w['text']}"))
    return out


def render_aligned(
    runs: Sequence[AlignedRun], out_dir: Path, *, matched_budget: float, title: str | None = None, grid_seeds: int = 2
) -> tuple[Path, dict]:
    """Write aligned.html and aligned.json into out_dir from the loaded judged runs; return the html path and the summary.

    The title defaults to the question about the runs' target class: "eightgen: does it become an 8?" ("... a Bag?").
    """
    if not runs:
        raise EightgenError("render_aligned: no runs given")
    summary = aligned_summary(runs, matched_budget)
    classes = classes_of(summary["dataset"])
    name = summary["target_name"]
    budgets = summary["budgets"]
    order = detector_order(summary)
    sweep = summary.get("sweep")
    fig = budget_figure(summary)
    figure = figure_img(
        fig,
        f"Five panels against the L2 budget, one line per detector with 95% intervals: flip rate, k-NN {name} share, robust "
        f"referee {name} share, standard referee {name} share, robust referee still-start-{classes.noun} share. At the matched budget: "
        + "; ".join(
            f"{d}: k-NN {fmt_ci(cell(summary, d, matched_budget)['referees']['knn'])}"
            for d in order
            if cell(summary, d, matched_budget) is not None
        ),
        f"{classes.noun.capitalize()} starts only. Bars: exact (Clopper–Pearson) 95% intervals over starts. Dashed lines on the k-NN panel: the "
        f"targets ({fmt_pct(KNN_STANDARD_MAX, 0)} for the standard, {fmt_pct(KNN_ROBUST_MIN, 0)} for the robust detector); dotted: the matched budget.",
        "fig-aligned",
    )
    context = {
        "title": title or f"eightgen: does it become {classes.with_article(summary['target'])}?",
        "summary": summary,
        "classes": classes,
        "target_name": name,
        "figure": figure,
        "budgets": budgets,
        "detectors": order,
        "referees": REFEREES,
        # A sweep's grid: every detector at the matched budget (one column per radius).
        "grid_budgets": [matched_budget] if sweep else budgets,
        "grid": image_grid(runs, [matched_budget] if sweep else budgets, grid_seeds, order),
        "sweep": sweep,
        "sweep_figure": sweep_img(sweep, summary["dataset"], summary["target"]) if sweep else None,
        "detector_facts": _detector_facts(runs),
        "referee_facts": _referee_facts(runs),
        "warnings": _warnings(runs),
        "cell": lambda d, b, kind="digits": cell(summary, d, b, kind),
        "runs": sorted(runs, key=lambda r: (r.radius, r.budget)),
        "attack": runs[0].record.config.attack.model_dump(mode="json"),
        "fmt_pct": fmt_pct,
        "fmt_num": fmt_num,
    }
    html = environment().get_template("aligned.html.j2").render(**context)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ALIGNED_HTML
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(target)
    (out_dir / ALIGNED_JSON).write_text(json.dumps(plain_json(summary), indent=2) + "\n")
    return target, summary
