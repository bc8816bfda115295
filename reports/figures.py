"""Pure matplotlib figures of run results (data in, Figure out) and the image helpers behind the film strips."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from eightgen.classes import MNIST, ClassSet  # noqa: E402
from eightgen.config import all_but  # noqa: E402
from reports.stats import ALL, NOISE  # noqa: E402

# Paul Tol's "muted" scheme (colour-blind safe) for the non-target classes in order, black for the target, grey for noise.
_TOL_MUTED = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499"]
NOISE_COLOUR, TARGET_COLOUR = "#6E6E6E", "#000000"
# Okabe-Ito (colour-blind safe) for runs in comparisons.
RUN_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442"]
DIVERGING = "RdBu_r"
REFERENCE = "#9A9A9A"

STYLE = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#E4E4E4",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}


def styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under the report's matplotlib style."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def group_colours(target: int = 8) -> dict[str, str]:
    """The fixed colour of every start group ("noise" or a class index) for a target class."""
    return {NOISE: NOISE_COLOUR, **{str(d): c for d, c in zip(all_but(target), _TOL_MUTED)}, str(target): TARGET_COLOUR}


def group_colour(label: str, target: int = 8) -> str:
    """The fixed colour of a start group ("noise" or a class index) for a target class."""
    return group_colours(target).get(label, REFERENCE)


def run_colour(i: int) -> str:
    """The colour of the i-th run in a comparison."""
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def group_title(label: str, classes: ClassSet = MNIST) -> str:
    """A panel title for a start group: "noise starts", "start digit 3", "start Dress"."""
    return "noise starts" if label == NOISE else f"start {classes.label(label)}"


def group_tick(label: str, classes: ClassSet = MNIST) -> str:
    """A start group as an axis label: "noise", "all", "digit 3", "Dress"."""
    return label if label in (NOISE, ALL) else classes.label(label)


def _panels(n: int, *, ncols: int = 5, panel: tuple[float, float] = (2.2, 1.75), extra_height: float = 0.35):
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    if n < 3:  # few panels: larger ones, so the shared legend still fits above them
        panel = (3.6, 2.4)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + extra_height), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _label_outer(axes: Sequence[Axes], ncols: int, xlabel: str, ylabel: str) -> None:
    n = len(axes)
    for i, ax in enumerate(axes):
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if i + ncols >= n:
            ax.set_xlabel(xlabel)
            ax.tick_params(labelbottom=True)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")


@styled
def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """The 2x2 validation confusion matrix, counts and row shares annotated."""
    counts = np.asarray(confusion, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, f"{int(c):,}\n{share[i, j]:.1%}", ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
    ticks = [str(c).replace("_", " ") for c in class_names]
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_yticks(range(len(ticks)), ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("validation confusion (row share)")
    return fig


@styled
def digit_error_figure(error_by_digit: Mapping[str, float], target: int, *, classes: ClassSet = MNIST) -> Figure:
    """Validation error per true class as bars; the target class highlighted."""
    digits = sorted(error_by_digit, key=int)
    err = np.array([error_by_digit[d] for d in digits], dtype=float) * 100
    fig = Figure(figsize=(5.6 if classes.numeric else 7.2, 3.0 if classes.numeric else 3.6), layout="constrained")
    ax = fig.subplots()
    colours = ["#D55E00" if int(d) == target else "#0072B2" for d in digits]
    bars = ax.bar(range(len(digits)), err, color=colours)
    ax.set_xticks(range(len(digits)), [classes.name_of(d) for d in digits], rotation=0 if classes.numeric else 30, ha="center" if classes.numeric else "right")
    ax.bar_label(bars, [f"{e:.2f}" for e in err], fontsize=7.5, padding=1)
    ax.set_xlabel(f"true {classes.noun}")
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"validation error by {classes.noun} (target {classes.name_of(target)} in orange)")
    ax.set_ylim(0, max(err.max() * 1.2, 0.1) if err.size else 1)
    return fig


@styled
def success_figure(table: pd.DataFrame, *, classes: ClassSet = MNIST, target: int = 8) -> Figure:
    """Success rate per start group with exact 95% intervals; the overall rate as a dashed line."""
    rows = table[table["group"] != ALL]
    fig = Figure(figsize=(min(8.5, 3.0 + 0.55 * len(rows)), 3.1), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    rate = rows["success_rate"].to_numpy(float) * 100
    err = np.vstack([rate - rows["success_lo"].to_numpy(float) * 100, rows["success_hi"].to_numpy(float) * 100 - rate])
    ax.bar(x, rate, color=[group_colour(g, target) for g in rows["group"]], width=0.7)
    ax.errorbar(x, rate, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    overall = table[table["group"] == ALL]
    if len(overall):
        ax.axhline(overall["success_rate"].iloc[0] * 100, color="black", ls="--", lw=1, label="all starts")
        fig.legend(loc="outside upper right")
    ax.set_xticks(x, [f"{group_tick(g, classes)}\nn={n}" for g, n in zip(rows["group"], rows["n"])])
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    return fig


@styled
def p_bands_figure(bands: Mapping[str, np.ndarray], target: int, *, classes: ClassSet = MNIST) -> Figure:
    """Small multiples: median p(target) per step with its 10-90% band across starts, one panel per start group."""
    labels = list(bands)
    fig, axes = _panels(len(labels))
    for ax, g in zip(axes, labels):
        lo, mid, hi = bands[g]
        t = np.arange(mid.size)
        colour = group_colour(g, target)
        ax.fill_between(t, lo, hi, color=colour, alpha=0.25, lw=0)
        ax.plot(t, mid, color=colour, lw=1.8)
        ax.axhline(0.5, color=REFERENCE, ls="--", lw=0.8)
        ax.set_title(group_title(g, classes))
    axes[0].set_ylim(-0.02, 1.02)
    _label_outer(axes, min(5, len(labels)), "step", f"p({classes.name_of(target)})")
    fig.legend(
        handles=[Line2D([], [], color="black", lw=1.8), Patch(color="black", alpha=0.25), Line2D([], [], color=REFERENCE, ls="--")],
        labels=["median", "10-90% of starts", "0.5"],
        loc="outside upper right",
        ncols=3 if len(labels) >= 3 else 1,
    )
    return fig


def survival_step(ax: Axes, band: np.ndarray, colour: str, lw: float = 1.8) -> None:
    """A Kaplan-Meier curve as steps, with its 95% band shaded when given (band: [curve] or [curve, lo, hi] per step)."""
    band = np.atleast_2d(band)
    steps = np.arange(band.shape[1])
    if band.shape[0] == 3:
        ax.fill_between(steps, band[1], band[2], step="post", color=colour, alpha=0.18, lw=0)
    ax.step(steps, band[0], where="post", color=colour, lw=lw)


@styled
def survival_figure(
    curves: Mapping[str, np.ndarray], overall: np.ndarray | None = None, *, classes: ClassSet = MNIST, target: int = 8
) -> Figure:
    """Small multiples: Kaplan-Meier share of starts not yet flipped per step with its 95% band, all starts in grey."""
    labels = list(curves)
    fig, axes = _panels(len(labels))
    for ax, g in zip(axes, labels):
        if overall is not None:
            ax.step(np.arange(np.atleast_2d(overall).shape[1]), np.atleast_2d(overall)[0], where="post", color=REFERENCE, lw=1)
        curve = np.atleast_2d(curves[g])
        survival_step(ax, curve, group_colour(g, target))
        ax.text(0.97, 0.93, f"end: {curve[0, -1]:.0%}", transform=ax.transAxes, ha="right", va="top", fontsize=7.5)
        ax.set_title(group_title(g, classes))
    axes[0].set_ylim(-0.02, 1.05)
    _label_outer(axes, min(5, len(labels)), "step", "not yet flipped")
    if overall is not None:
        fig.legend(
            handles=[Line2D([], [], color="black", lw=1.8), Patch(facecolor="black", alpha=0.18), Line2D([], [], color=REFERENCE, lw=1)],
            labels=["this group", "95% band", "all starts"],
            loc="outside upper right",
            ncols=3,
        )
    return fig


def _boxes(ax: Axes, data: list[np.ndarray], positions: np.ndarray, colours: list[str], *, filled: bool, width: float) -> None:
    keep = [i for i, d in enumerate(data) if d.size]
    if not keep:
        return
    parts = ax.boxplot(
        [data[i] for i in keep],
        positions=positions[keep],
        widths=width,
        patch_artist=True,
        showfliers=True,
        flierprops={"marker": ".", "markersize": 2.5, "alpha": 0.5, "rasterized": True},
        medianprops={"color": "black" if filled else "#222222", "lw": 1.3},
        manage_ticks=False,
    )
    for i, box in zip(keep, parts["boxes"]):
        box.set_facecolor(colours[i] if filled else "white")
        box.set_edgecolor("black" if filled else colours[i])
        box.set_alpha(0.85 if filled else 1.0)
    for k, flier in enumerate(parts["fliers"]):
        flier.set_markeredgecolor(colours[keep[k]])


@styled
def l2_box_figure(
    l2_flip: Mapping[str, np.ndarray], l2_final: Mapping[str, np.ndarray], *, classes: ClassSet = MNIST, target: int = 8
) -> Figure:
    """Box plots per start group of the L2 change at the flip (outlined) and at the end (filled)."""
    labels = list(l2_final)
    x = np.arange(len(labels), dtype=float)
    colours = [group_colour(g, target) for g in labels]
    fig = Figure(figsize=(min(9.5, 4.5 + 0.6 * len(labels)), 3.3), layout="constrained")
    ax = fig.subplots()
    _boxes(ax, [_finite(l2_flip.get(g, np.empty(0))) for g in labels], x - 0.19, colours, filled=False, width=0.32)
    _boxes(ax, [_finite(l2_final[g]) for g in labels], x + 0.19, colours, filled=True, width=0.32)
    ax.set_xticks(x, [group_tick(g, classes) for g in labels])
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("L2 of x − x0 (pixel units)")
    fig.legend(
        handles=[Patch(facecolor="white", edgecolor="black"), Patch(facecolor="#888888", edgecolor="black")],
        labels=["at the flip (flipped starts)", "at the end (all starts)"],
        loc="outside upper right",
        ncols=2,
    )
    return fig


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


@styled
def flip_scatter_figure(
    flip_step: np.ndarray, l2_at_flip: np.ndarray, labels: np.ndarray, order: Sequence[str], *, seed: int = 0,
    classes: ClassSet = MNIST, target: int = 8,
) -> Figure:
    """L2 change at the flip against the flip step, one colour per start group (steps jittered by up to 0.3)."""
    flip_step = np.asarray(flip_step, dtype=float)
    l2 = np.asarray(l2_at_flip, dtype=float)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-0.3, 0.3, flip_step.size)
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ok = np.flatnonzero(np.isfinite(flip_step) & np.isfinite(l2))
    if not ok.size:
        _empty(ax, "no start flipped")
    else:
        # One call in shuffled order, so no group hides behind the one drawn after it.
        ok = rng.permutation(ok)
        dense = ok.size > 1500
        ax.scatter(
            flip_step[ok] + jitter[ok],
            l2[ok],
            s=6 if dense else 16,
            alpha=0.4 if dense else 0.75,
            c=[group_colour(g, target) for g in labels[ok]],
            lw=0,
            rasterized=True,
        )
        shown = [g for g in order if np.any(labels[ok] == g)]
        fig.legend(
            handles=[Line2D([], [], ls="", marker="o", color=group_colour(g, target)) for g in shown],
            labels=[g if g == NOISE else classes.name_of(g) for g in shown],
            title="start",
            loc="outside right upper",
        )
    ax.set_xlabel("flip step")
    ax.set_ylabel("L2 at flip (pixel units)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=-0.5)
    return fig


def display_image(x: np.ndarray) -> np.ndarray:
    """A [C, 28, 28] (or [28, 28]) pixel-space image as float32 [28, 28]: channel mean, clipped to [0, 1]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x.mean(axis=0)
    return np.clip(x, 0.0, 1.0)


def grey_uint8(x: np.ndarray) -> np.ndarray:
    """A pixel-space image as uint8 grey levels (cmap gray, vmin 0, vmax 1; values outside are clipped)."""
    return np.round(display_image(x) * 255).astype(np.uint8)


def diverging_rgb(delta: np.ndarray, vmax: float) -> np.ndarray:
    """A perturbation (channel mean) as uint8 RGB [28, 28, 3] on a symmetric diverging scale [-vmax, vmax]."""
    d = np.asarray(delta, dtype=np.float32)
    if d.ndim == 3:
        d = d.mean(axis=0)
    scaled = 0.5 + 0.5 * d / vmax if vmax > 0 else np.full_like(d, 0.5)
    rgba = colormaps[DIVERGING](np.clip(scaled, 0.0, 1.0), bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def diverging_stops(n: int = 9) -> list[str]:
    """Hex colours along the diverging map, for a colour key."""
    cmap = colormaps[DIVERGING]
    return [matplotlib.colors.to_hex(cmap(v)) for v in np.linspace(0, 1, n)]
