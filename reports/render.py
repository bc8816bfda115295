"""Render a run directory (or several, side by side) into one self-contained HTML report."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from upath import UPath

from eightgen.artifacts import write_text_atomically
from eightgen.config import ReportConfig
from eightgen.errors import EightgenError
from eightgen.store import local, location
from eightgen.rundir import REPORT, is_run_dir, trajectories, write_report
from reports import compare_figures, figures, stats
from reports.formatting import fmt_int, fmt_num, fmt_pct, fmt_prob, fmt_raw, fmt_scale, fmt_step, table_rows
from reports.images import Img, figure_img
from reports.narrative import classes_of, dataset_table, default_title, headline, model_facts, plabel_of, run_facts, warnings_of
from reports.runs import Run, load_run, read_snapshots
from reports.stats import ALL
from reports.strips import animation_rows, animations, film_strips, gallery, gallery_rows, sample_rows


@cache
def environment() -> Environment:
    """The jinja environment of the report templates, with the number filters."""
    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt_num, pct=fmt_pct, prob=fmt_prob, step=fmt_step, int=fmt_int, raw=fmt_raw, scale=fmt_scale)
    return env


# ---------------------------------------------------------------- single run

RUN_PARTS = 11  # what run_html reports to `progress`: snapshots, animations, classifier, 5 figures, strips, galleries, page


def _figure_imgs(run: Run, part: Callable[[], None] = lambda: None) -> dict[str, Img]:
    res, table, order, plabel = run.results, run.table, run.order, plabel_of(run)
    classes, target = classes_of(run), run.target
    named = {"classes": classes, "target": target}
    groups = res["group"].to_numpy()
    per_group = table[table["group"] != ALL]
    p = run.p_target[res["traj_row"].to_numpy()]
    bands = stats.quantile_bands(p, groups, order)
    horizon = p.shape[1] - 1
    curves = {g: np.stack(stats.survival_band_of(res[groups == g], horizon)) for g in order}
    overall = stats.survival_of(res, horizon)
    l2_final = {g: stats.as_float(res.loc[groups == g, "l2_final"]) for g in order}
    l2_flip = {g: stats.as_float(res.loc[groups == g, "l2_at_flip"]) for g in order}
    flip = stats.as_float(res["flip_step"])
    l2f = stats.as_float(res["l2_at_flip"])
    ok = np.isfinite(flip) & np.isfinite(l2f)
    corr = float(np.corrcoef(flip[ok], l2f[ok])[0, 1]) if ok.sum() > 2 and np.std(flip[ok]) > 0 and np.std(l2f[ok]) > 0 else np.nan

    def listing(values: dict[str, str]) -> str:
        return "; ".join(f"{figures.group_tick(g, classes)}: {v}" for g, v in values.items())

    def img(*args: object) -> Img:  # each figure is one part of the page
        made = figure_img(*args)
        part()
        return made

    return {
        "success": img(
            figures.success_figure(table, **named),
            "Bar chart of the success rate per start group with exact 95% intervals. "
            + listing({r.group: f"{fmt_pct(r.success_rate)} ({fmt_pct(r.success_lo, 0)}–{fmt_pct(r.success_hi, 0)}, {r.successes} of {r.n})" for r in per_group.itertuples()}),
            f"Share of starts classified as {classes.name_of(target)} at the last step; bars are exact (Clopper–Pearson) 95% intervals; "
            "the dashed line is the rate over all starts.",
            "fig-success",
        ),
        "bands": img(
            figures.p_bands_figure(bands, target, classes=classes),
            f"Small multiples, one per start group, of the median {plabel} against step with a 10–90% band. Median {plabel} "
            "at the last step: " + listing({g: fmt_prob(b[1, -1]) for g, b in bands.items()}),
            f"{plabel} of every start at every step: line = median over the group's starts, band = 10th to 90th percentile.",
            "fig-p-target",
        ),
        "survival": img(
            figures.survival_figure(curves, overall, **named),
            f"Small multiples of Kaplan-Meier curves: share of starts not yet classified as {classes.name_of(target)} against step. Share "
            "never flipped at the end, with its 95% band: " + listing({g: f"{fmt_pct(c[0, -1])} ({fmt_pct(c[1, -1], 0)}–{fmt_pct(c[2, -1], 0)})" for g, c in curves.items()}),
            f"Kaplan-Meier estimate of the share not yet flipped (argmax not yet {classes.name_of(target)}; scipy.stats.ecdf on censored data); "
            "starts that never flip count as censored at their last step. Shaded: pointwise 95% band (Greenwood, log-log). Grey: all starts.",
            "fig-survival",
        ),
        "l2": img(
            figures.l2_box_figure(l2_flip, l2_final, **named),
            "Box plots per start group of the L2 change at the flip and at the end. Median final L2: "
            + listing({r.group: fmt_num(r.l2_final_median) for r in per_group.itertuples()}),
            "L2 norm of x − x0 in pixel units of [0, 1] images, summed over channels. Outlined: at the flip step "
            "(flipped starts only); filled: after the last step (all starts). Boxes span the quartiles; whiskers 1.5 IQR.",
            "fig-l2",
        ),
        "scatter": img(
            figures.flip_scatter_figure(flip, l2f, groups, order, **named),
            f"Scatter plot of the L2 change at the flip against the flip step for {int(ok.sum())} flipped starts, "
            f"coloured by start group; correlation {fmt_num(corr)}.",
            "Each point is a start that flipped; steps are jittered by up to ±0.3 so equal steps do not overlap.",
            "fig-flip-scatter",
        ),
    }


def _classifier_imgs(run: Run) -> dict[str, Img]:
    metrics = run.record.model.metrics
    classes = classes_of(run)
    out = {}
    confusion = metrics.get("confusion")
    if confusion:
        names = [f"not {classes.name_of(run.target)}", classes.name_of(run.target)]
        (tn, fp), (fn, tp) = confusion
        out["confusion"] = figure_img(
            figures.confusion_figure(confusion, names),
            f"Confusion matrix on the validation set: true {names[0]} predicted {names[0]} {tn}, predicted {names[1]} {fp}; "
            f"true {names[1]} predicted {names[0]} {fn}, predicted {names[1]} {tp}.",
            "Validation confusion matrix, rows = true class (counts and row shares).",
            "fig-confusion",
        )
    by_digit = metrics.get("valid_error_by_digit")
    if by_digit:
        out["digit_error"] = figure_img(
            figures.digit_error_figure(by_digit, run.target, classes=classes),
            f"Bar chart of validation error per true {classes.noun}: "
            + ", ".join(f"{classes.name_of(d)}: {fmt_pct(by_digit[d], 2)}" for d in sorted(by_digit, key=int)),
            f"Validation error per true {classes.noun} (for the target {classes.name_of(run.target)}: missed targets; for the others: false alarms).",
            "fig-digit-error",
        )
    return out


def run_context(run: Run, cfg: ReportConfig | None = None, part: Callable[[], None] = lambda: None) -> dict:
    """Everything the single-run template shows (`part()` after each of its parts: all but the page of RUN_PARTS)."""
    if cfg is not None:
        run.report = cfg
    plabel = plabel_of(run)
    chosen = sample_rows(run)
    most, least = gallery_rows(run)
    anim_rows = animation_rows(run)
    traj_rows = run.results.loc[[i for rows in chosen.values() for i in rows] + most + least + anim_rows, "traj_row"]
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    snaps, x0_norms = read_snapshots(trajectories(run.path), traj_rows, step0)
    part()
    anims = animations(run, anim_rows, snaps, plabel)
    part()
    classifier = _classifier_imgs(run)
    part()
    figs = _figure_imgs(run, part)
    strips = film_strips(run, chosen, snaps, plabel)
    part()
    most_imgs, least_imgs = gallery(run, most, snaps, plabel), gallery(run, least, snaps, plabel)
    part()
    return {
        "title": run.report.title or default_title(run),
        "run": run,
        "classes": classes_of(run),
        "target_name": classes_of(run).name_of(run.target),
        "group_names": {g: figures.group_tick(g, classes_of(run)) for g in [*run.order, ALL]},
        "record": run.record,
        "plabel": plabel,
        "head": headline(run, x0_norms),
        "warnings": warnings_of(run),
        "dataset": dataset_table(run),
        "classifier": classifier,
        "table": table_rows(run.table),
        "figs": figs,
        "strips": strips,
        "frames_per_strip": run.report.frames_per_strip,
        "animations": anims,
        "anim_data": [a["data"] for a in anims],
        "most": most_imgs,
        "least": least_imgs,
        "key": figures.diverging_stops(),
        "config_json": json.dumps(run.record.config.model_dump(mode="json"), indent=2, sort_keys=True),
        "model_facts": model_facts(run),
        "run_facts": run_facts(run),
        "saturated_p": f"{stats.SATURATED_P:g}",
    }


# ---------------------------------------------------------------- comparison


def _relative_link(run: Run, out: Path) -> str | None:
    report = run.path / REPORT
    return Path(os.path.relpath(report.resolve(), out.resolve().parent)).as_posix() if report.is_file() else None


def _unique_names(runs: list[Run]) -> list[str]:
    names, seen = [], {}
    for r in runs:
        base = r.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return names


def compare_context(runs: list[Run], out: Path) -> dict:
    """Everything the comparison template shows."""
    names = _unique_names(runs)
    same = len({(r.target, classes_of(r).name) for r in runs}) == 1
    classes = classes_of(runs[0]) if same else None
    plabel = plabel_of(runs[0]) if same else "p(target)"
    named = {"classes": classes} if classes is not None else {}
    tables = {n: r.table for n, r in zip(names, runs)}
    medians, curves, l2 = {}, {}, {}
    for n, r in zip(names, runs):
        groups = r.results["group"].to_numpy()
        p = r.p_target[r.results["traj_row"].to_numpy()]
        horizon = p.shape[1] - 1
        medians[n] = {g: np.median(p[groups == g], axis=0) for g in r.order}
        curves[n] = {g: np.stack(stats.survival_band_of(r.results[groups == g], horizon)) for g in r.order}
        l2[n] = {g: stats.as_float(r.results.loc[groups == g, "l2_final"]) for g in r.order}
    rows = []
    for n, r in zip(names, runs):
        rows.append({"name": n, "run": r, "head": headline(r), "link": _relative_link(r, out), "warnings": warnings_of(r)})
    overall = "; ".join(
        f"{n}: {fmt_pct(a['success_rate'])} ({fmt_pct(a['success_lo'], 0)}–{fmt_pct(a['success_hi'], 0)}, {a['successes']} of {a['n']})"
        for n, t in tables.items()
        for a in [t[t["group"] == ALL].iloc[0]]
    )
    figs = {
        "success": figure_img(
            compare_figures.success_compare_figure(tables, **named),
            f"Grouped bar chart of the success rate per start group, one bar per run, with exact 95% intervals. Overall: {overall}.",
            "Share of starts classified as the target at the last step, per run (exact Clopper–Pearson 95% intervals).",
            "fig-compare-success",
        ),
        "median_p": figure_img(
            compare_figures.median_p_compare_figure(medians, plabel, **named),
            f"Small multiples per start group of the median {plabel} against step, one line per run.",
            f"Median {plabel} over each group's starts at every step, per run.",
            "fig-compare-p",
        ),
        "survival": figure_img(
            compare_figures.survival_compare_figure(curves, **named),
            "Small multiples per start group of Kaplan-Meier curves of the share not yet flipped with 95% bands, one line per run.",
            "Kaplan-Meier share of starts not yet flipped, per run (never-flipped starts censored at their last step); shaded: pointwise 95% band.",
            "fig-compare-survival",
        ),
        "l2": figure_img(
            compare_figures.l2_compare_figure(l2, **named),
            "Box plots of the final L2 change per start group, one box per run.",
            "Final L2 of x − x0 (pixel units of [0, 1] images), per start group and run.",
            "fig-compare-l2",
        ),
    }
    group_names = {g: figures.group_tick(g, classes) if classes is not None else g for r in runs for g in [*r.order, ALL]}
    return {"title": "eightgen comparison: " + ", ".join(names), "runs": rows, "figs": figs, "plabel": plabel, "group_names": group_names}


# ---------------------------------------------------------------- entry points


def run_html(run: Run, report: ReportConfig | None = None, progress: Callable[[int, int], None] | None = None) -> str:
    """The self-contained report page of one loaded run; `progress(done, RUN_PARTS)` after each part, if given."""
    done = itertools.count(1)
    part = (lambda: progress(next(done), RUN_PARTS)) if progress is not None else (lambda: None)
    html = environment().get_template("run.html.j2").render(**run_context(run, report, part))
    part()
    return html


def _dirs(run_dirs: Sequence[Path] | Path) -> list[Path | UPath]:
    return [location(run_dirs)] if isinstance(run_dirs, (str, os.PathLike, UPath)) else [location(d) for d in run_dirs]


def report_html(run_dirs: Sequence[Path] | Path, out: Path | None = None, *, report: ReportConfig | None = None) -> tuple[Path, str]:
    """The report of one run directory, or the comparison of several, and the file it belongs in (here, for a run in
    a store: in this host's copy of it)."""
    dirs = _dirs(run_dirs)
    if not dirs:
        raise EightgenError("no run directories given")
    if len(dirs) == 1:
        target = Path(out) if out is not None else local(dirs[0]) / REPORT
        return target, run_html(load_run(dirs[0]), report)
    target = Path(out) if out is not None else local(dirs[0]).resolve().parent / "compare.html"
    return target, environment().get_template("compare.html.j2").render(**compare_context([load_run(d) for d in dirs], target))


def render_report(run_dirs: Sequence[Path] | Path, out: Path | None = None, *, report: ReportConfig | None = None) -> Path:
    """Render and write the report: into the run directory (with its manifest; a run in a store: published there) by
    default, else to `out`."""
    target, html = report_html(run_dirs, out, report=report)
    dirs = _dirs(run_dirs)
    if out is None and len(dirs) == 1 and is_run_dir(dirs[0]):
        write_report(dirs[0], html, {"rendered_by": "eightgen report"})
        return target
    if target.is_dir():
        raise EightgenError(f"{target} is a directory: give a file name for the report")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(target, html)
    return target
