"""Pure matplotlib figures that compare several runs side by side (data in, Figure out), one colour per run."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from eightgen.classes import MNIST, ClassSet
from reports.figures import REFERENCE, _boxes, _finite, _label_outer, _panels, group_tick, group_title, run_colour, styled, survival_step
from reports.stats import ALL, NOISE


@styled
def success_compare_figure(tables: Mapping[str, pd.DataFrame], *, classes: ClassSet = MNIST) -> Figure:
    """Grouped bars: success rate per start group, one bar (with 95% interval) per run."""
    names = list(tables)
    groups = _union_groups(t["group"] for t in tables.values())
    width = 0.8 / max(len(names), 1)
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        rows = tables[name].set_index("group").reindex(groups)
        rate = rows["success_rate"].to_numpy(float) * 100
        lo = rows["success_lo"].to_numpy(float) * 100
        hi = rows["success_hi"].to_numpy(float) * 100
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, rate, width=width * 0.92, color=run_colour(i), label=name)
        ax.errorbar(pos, rate, yerr=np.vstack([rate - lo, hi - rate]), fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(x, [group_tick(g, classes) for g in groups])
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    fig.legend(loc="outside upper right", ncols=min(len(names), 4))
    return fig


def _union_groups(columns) -> list[str]:
    seen: set[str] = set()
    for col in columns:
        seen.update(str(g) for g in col)
    rest = sorted((g for g in seen if g not in (NOISE, ALL)), key=int)
    return ([NOISE] if NOISE in seen else []) + rest + ([ALL] if ALL in seen else [])


def _run_panels(
    per_run: Mapping[str, Mapping[str, np.ndarray]], draw: Callable[[Axes, np.ndarray, str], None], classes: ClassSet = MNIST
):
    groups = _union_groups(v.keys() for v in per_run.values())
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        for i, name in enumerate(per_run):
            if g in per_run[name]:
                draw(ax, per_run[name][g], run_colour(i))
        ax.set_title(group_title(g, classes) if g != ALL else "all starts")
    fig.legend(
        handles=[Line2D([], [], color=run_colour(i), lw=1.8) for i in range(len(per_run))],
        labels=list(per_run),
        loc="outside upper right",
        ncols=min(len(per_run), 4),
    )
    return fig, axes


@styled
def median_p_compare_figure(medians: Mapping[str, Mapping[str, np.ndarray]], plabel: str, *, classes: ClassSet = MNIST) -> Figure:
    """Small multiples per start group: median p(target) against step, one line per run."""
    fig, axes = _run_panels(medians, lambda ax, y, c: ax.plot(np.arange(y.size), y, color=c, lw=1.6), classes)
    for ax in axes:
        ax.axhline(0.5, color=REFERENCE, ls="--", lw=0.8)
    axes[0].set_ylim(-0.02, 1.02)
    _label_outer(axes, min(5, len(axes)), "step", f"median {plabel}")
    return fig


@styled
def survival_compare_figure(curves: Mapping[str, Mapping[str, np.ndarray]], *, classes: ClassSet = MNIST) -> Figure:
    """Small multiples per start group: Kaplan-Meier share not yet flipped with its 95% band, one line per run."""
    fig, axes = _run_panels(curves, lambda ax, y, c: survival_step(ax, y, c, lw=1.6), classes)
    axes[0].set_ylim(-0.02, 1.05)
    _label_outer(axes, min(5, len(axes)), "step", "not yet flipped")
    return fig


@styled
def l2_compare_figure(values: Mapping[str, Mapping[str, np.ndarray]], *, classes: ClassSet = MNIST) -> Figure:
    """Box plots of the final L2 change per start group, one box per run side by side."""
    names = list(values)
    groups = _union_groups(v.keys() for v in values.values())
    width = 0.8 / max(len(names), 1)
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups), dtype=float)
    for i, name in enumerate(names):
        data = [_finite(values[name].get(g, np.empty(0))) for g in groups]
        _boxes(ax, data, x - 0.4 + width * (i + 0.5), [run_colour(i)] * len(groups), filled=True, width=width * 0.85)
    ax.set_xticks(x, [group_tick(g, classes) for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("final L2 of x − x0 (pixel units)")
    fig.legend(
        handles=[Patch(facecolor=run_colour(i), edgecolor="black") for i in range(len(names))],
        labels=names,
        loc="outside upper right",
        ncols=min(len(names), 4),
    )
    return fig
