"""The robustness sweep: each referee's target share against the detectors' training radius, one line per budget, beside
each detector's clean error and robust accuracy, every share with its exact 95% interval."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from eightgen.classes import classes_of
from reports import figures, stats
from reports.formatting import fmt_pct
from reports.images import Img, figure_img

SWEEP_REFEREES = ("knn", "robust", "cnn")
DRAWS = 0.5  # "it draws the target": the k-NN vote's lower bound reaches this share at the matched budget


def is_sweep(names: Sequence[str]) -> bool:
    """Whether the detectors are more (or other) than the classic pair standard + robust."""
    return set(names) != {"standard", "robust"}


def detector_order(summary: Mapping) -> list[str]:
    """The detectors of an aligned summary's cells, ascending training radius."""
    radius = {c["detector"]: c.get("radius", 0.0 if c["detector"] == "standard" else 1.0) for c in summary["cells"]}
    return sorted(radius, key=radius.get)


def detector_colours(names: Sequence[str], classic: Mapping[str, str]) -> Mapping[str, object]:
    """The classic pair's colours, or one colour per radius (names in ascending radius) for a sweep."""
    if not is_sweep(names):
        return classic
    cmap = colormaps["plasma"]
    return {d: cmap(0.85 * i / max(len(names) - 1, 1)) for i, d in enumerate(names)}


def detector_row(fact: Mapping) -> dict:
    """One detector's radius, clean validation error and robust accuracy as shares with exact intervals."""
    n_valid = int(fact.get("n_valid") or 0)
    confusion = fact.get("confusion")
    wrong = int(confusion[0][1] + confusion[1][0]) if confusion else None  # the off-diagonal: misclassified images
    if wrong is None and fact.get("valid_error") is not None:
        wrong = round(float(fact["valid_error"]) * n_valid)
    robust = fact.get("robust") or {}
    n_rob = int(robust.get("n") or 0)
    return {
        "detector": fact["detector"],
        "radius": float(fact["radius"]),
        "clean_error": stats.counted_share(int(wrong or 0), n_valid),
        "robust_accuracy": stats.counted_share(round(float(robust["robust_accuracy"]) * n_rob), n_rob) if robust else None,
        "eval": {k: robust[k] for k in ("norm", "eps", "steps") if k in robust} or None,
    }


def sweep_summary(cells: Sequence[Mapping], facts: Sequence[Mapping], matched_budget: float) -> dict:
    """Per detector (ascending radius) its clean error and robust accuracy; per referee and budget its target share at
    every radius (digit starts); the common robust-accuracy radius; the smallest radius that draws the target."""
    detectors = sorted((detector_row(f) for f in facts), key=lambda d: d["radius"])
    order = [d["detector"] for d in detectors]
    budgets = sorted({float(c["budget"]) for c in cells})
    by_key = {(c["detector"], float(c["budget"])): c["digits"] for c in cells if c.get("digits") is not None}
    curves = []
    for referee in SWEEP_REFEREES:
        for b in budgets:
            points = [
                {"detector": d["detector"], "radius": d["radius"], **by_key[(d["detector"], b)]["referees"][referee]}
                for d in detectors
                if (d["detector"], b) in by_key
            ]
            curves.append({"referee": referee, "budget": b, "points": points})
    evals = {tuple(sorted(d["eval"].items())) for d in detectors if d["eval"]}
    out = {
        "detectors": detectors,
        "order": order,
        "budgets": budgets,
        "matched_budget": matched_budget,
        "eval": dict(next(iter(evals))) if len(evals) == 1 else None,
        "curves": curves,
    }
    out["draws_from"] = draws_from(out)
    return out


def curve(sweep: Mapping, referee: str, budget: float) -> list[dict]:
    """The points (one per radius) of one referee's target share at one budget."""
    for c in sweep["curves"]:
        if c["referee"] == referee and c["budget"] == budget:
            return c["points"]
    return []


def draws_from(sweep: Mapping) -> dict | None:
    """The smallest radius at which the k-NN vote's lower bound reaches DRAWS at the matched budget, with its point."""
    for p in curve(sweep, "knn", sweep["matched_budget"]):
        if stats.at_least(p, DRAWS):
            return p
    return None


def sweep_answer(sweep: Mapping, target_name: str, plural: str) -> str:
    """How much robustness it takes to draw the target, in one sentence from the matched-budget k-NN shares."""
    b = sweep["matched_budget"]
    points = curve(sweep, "knn", b)
    if not points:
        return f"No answer: no detector has results at the matched budget {b:g}."
    said = "; ".join(f"ε {p['radius']:g}: {fmt_pct(p['share'])} [{fmt_pct(p['lo'])}–{fmt_pct(p['hi'])}]" for p in points)
    first = sweep["draws_from"]
    rows = {d["detector"]: d for d in sweep["detectors"]}
    if first is None:
        return (
            f"At budget {b:g} no training radius up to {points[-1]['radius']:g} makes the k-NN vote call at least half of the "
            f"results {target_name} (lower bound of the 95% interval): {said}."
        )
    cost = rows[first["detector"]]["clean_error"]
    return (
        f"At budget {b:g} the k-NN vote calls the results {target_name} ({said}): training at L2 radius {first['radius']:g} is the "
        f"least of these that draws {plural} (95% lower bound at least {fmt_pct(DRAWS, 0)}), at a clean validation error of "
        f"{fmt_pct(cost['share'], 2)} [{fmt_pct(cost['lo'], 2)}–{fmt_pct(cost['hi'], 2)}]."
    )


def _errorbar(ax, x: np.ndarray, shares: Sequence[Mapping], **kw) -> None:
    y = np.array([s["share"] for s in shares], dtype=float)
    err = np.array([[s["share"] - s["lo"] for s in shares], [s["hi"] - s["share"] for s in shares]], dtype=float)
    ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", ms=3.5, lw=1.4, capsize=2, **kw)


@figures.styled
def sweep_figure(sweep: Mapping, titles: Mapping[str, str], noun: str) -> Figure:
    """Per referee its target share against the training radius, one line per budget; then each detector's clean
    error and robust accuracy against its radius (exact 95% intervals)."""
    fig = Figure(figsize=(13.0, 2.8), layout="constrained")
    axes = fig.subplots(1, len(SWEEP_REFEREES) + 2)
    budgets = sweep["budgets"]
    cmap = colormaps["viridis"]
    radii = [d["radius"] for d in sweep["detectors"]]
    for ax, referee in zip(axes, SWEEP_REFEREES):
        for i, b in enumerate(budgets):
            points = curve(sweep, referee, b)
            if points:
                colour = cmap(0.9 * i / max(len(budgets) - 1, 1))
                _errorbar(ax, np.array([p["radius"] for p in points]), points, color=colour, label=f"budget {b:g}")
        ax.set_title(titles[referee])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(radii, [f"{r:g}" for r in radii], fontsize=7)
        ax.set_xlabel("training radius (L2)")
    axes[0].set_ylabel(f"share of {noun} starts")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(budgets), fontsize=8)
    for ax in axes[1 : len(SWEEP_REFEREES)]:
        ax.sharey(axes[0])
    err_ax, rob_ax = axes[len(SWEEP_REFEREES) :]
    x = np.array(radii)
    _errorbar(err_ax, x, [d["clean_error"] for d in sweep["detectors"]], color=figures.REFERENCE)
    err_ax.set_title("clean validation error")
    err_ax.set_ylim(bottom=0)
    rated = [d for d in sweep["detectors"] if d["robust_accuracy"] is not None]
    if rated:
        _errorbar(rob_ax, np.array([d["radius"] for d in rated]), [d["robust_accuracy"] for d in rated], color=figures.REFERENCE)
    ev = sweep["eval"]
    rob_ax.set_title(f"robust accuracy, {ev['norm'].upper()} PGD ε {ev['eps']:g}" if ev else "robust accuracy (radii differ)")
    rob_ax.set_ylim(-0.03, 1.03)
    for ax in (err_ax, rob_ax):
        ax.set_xticks(radii, [f"{r:g}" for r in radii], fontsize=7)
        ax.set_xlabel("training radius (L2)")
    return fig


def sweep_img(sweep: Mapping, dataset: str, target: int) -> Img:
    """The sweep figure, embedded, with its alt text (the numbers' answer) and caption."""
    classes = classes_of(dataset)
    name = classes.name_of(target)
    titles = {"knn": f"k-NN: nearer to real {classes.plural(target)}", "robust": f"robust referee says {name}", "cnn": f"standard referee says {name}"}
    ev = sweep["eval"]
    at = f"{ev['norm'].upper()} PGD ε {ev['eps']:g}, {ev.get('steps', '?')} steps" if ev else "each detector's own radius"
    radii = ", ".join(format(d["radius"], "g") for d in sweep["detectors"])
    return figure_img(
        sweep_figure(sweep, titles, classes.noun),
        f"Five panels against the detectors' training radius ({radii}): the k-NN, robust-referee and standard-referee {name} "
        f"shares, one line per L2 budget, then each detector's clean validation error and robust accuracy ({at}). " + sweep["answer"],
        f"{classes.noun.capitalize()} starts only. Bars: exact (Clopper–Pearson) 95% intervals. Robust accuracy: {at}, on the first "
        "validation images, the same radius for every detector.",
        "fig-sweep",
    )
