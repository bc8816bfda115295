"""What a report says in words: the headline numbers, the answer sentence, model and run facts, warnings, dataset counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from eightgen.attack.methods import loss_name, step_size
from eightgen.classes import ClassSet
from reports import stats
from reports.formatting import fmt_int, fmt_num, fmt_pct, fmt_step
from reports.runs import Run
from reports.stats import ALL, NOISE

PIXELS = 28 * 28


def classes_of(run: Run) -> ClassSet:
    """The class names of the run's dataset (MNIST's digits, Fashion-MNIST's clothes), from its recorded config."""
    return run.record.config.dataset.classes


def plabel_of(run: Run) -> str:
    """How the report writes the probability of the target: "p(8)", "p(Bag)"."""
    return f"p({classes_of(run).name_of(run.target)})"


def default_title(run: Run) -> str:
    """The run report's title when its config gives none: the dataset and the target class."""
    classes = classes_of(run)
    return f"eightgen report: {classes.title}, {classes.label(run.target)} vs the rest"


def _channels(run: Run) -> int:
    return int(run.record.model.spec.get("channels") or run.record.config.train.channels)


def headline(run: Run, x0_norms: np.ndarray | None = None) -> dict:
    """The key numbers of a run: what ran, on what, and what came out."""
    res, all_row = run.results, run.table[run.table["group"] == ALL].iloc[0]
    attack, model = run.attack, run.record.model
    crossed_col = "step_p50" if "step_p50" in res else "flip_step"
    crossed = stats.as_float(res[crossed_col])
    l2_flip = stats.as_float(res["l2_at_flip"])
    kinds = res["group"].value_counts()
    digit_rows = (res["group"] != NOISE).to_numpy()
    start_norm = float(np.median(x0_norms[res["traj_row"].to_numpy()[digit_rows]])) if x0_norms is not None and digit_rows.any() else np.nan
    l2_median = float(np.nanmedian(l2_flip)) if np.isfinite(l2_flip).any() else np.nan
    ratio = l2_median / start_norm if start_norm and np.isfinite(start_norm) and start_norm > 0 else np.nan
    crossed_ci = stats.share_ci(np.isfinite(crossed))
    crossed_share = crossed_ci["share"]
    crossed_median = float(np.nanmedian(crossed)) if np.isfinite(crossed).any() else np.nan
    rms = l2_median / math.sqrt(_channels(run) * PIXELS) if np.isfinite(l2_median) else np.nan
    return {
        "answer": _answer(plabel_of(run), crossed_ci, crossed_median, l2_median, rms, ratio, start_norm, classes_of(run), run.target),
        "method": attack.method,
        "loss": loss_name(attack),
        "lr": step_size(attack),
        "lr_is_default": attack.lr is None,
        "eps": attack.eps,
        "steps": int(np.nanmax(stats.as_float(res["steps"]))),
        "n": len(res),
        "n_noise": int(kinds.get(NOISE, 0)),
        "n_digit": int(len(res) - kinds.get(NOISE, 0)),
        "n_digit_groups": int(sum(1 for g in kinds.index if g != NOISE)),
        "seeds": attack.seeds,
        "device": run.record.device,
        "attack_seconds": run.record.attack_seconds,
        "arch": model.spec.get("arch", run.record.config.train.arch),
        "channels": _channels(run),
        "normalize": model.spec.get("normalize", run.record.config.train.normalize),
        "valid_error": model.metrics.get("valid_error"),
        "all": all_row,
        "crossed_share": crossed_share,
        "crossed_lo": crossed_ci["lo"],
        "crossed_hi": crossed_ci["hi"],
        "crossed_median": crossed_median,
        "l2_flip_median": l2_median,
        "rms_flip": rms,
        "start_norm": start_norm,
        "ratio": ratio,
    }


def _answer(
    plabel: str, crossed: dict, median_step: float, l2: float, rms: float, ratio: float, start_norm: float, classes: ClassSet, target: int
) -> str:
    """The seed experiment's question answered in one or two plain sentences."""
    if crossed["k"] == 0:
        return (f"No: {plabel} never crossed 0.5 for any of {crossed['n']} starts within the step budget "
                f"(95% CI 0–{fmt_pct(crossed['hi'], 0)} of such starts).")
    said = (
        f"{plabel} crossed 0.5 for {fmt_pct(crossed['share'], 0)} of starts (95% CI {fmt_pct(crossed['lo'], 0)}–{fmt_pct(crossed['hi'], 0)}, "
        f"{crossed['k']} of {crossed['n']}) after a median of {fmt_step(median_step)} steps, "
        f"while the median L2 change at the flip was {fmt_num(l2)} (an RMS change of {fmt_num(rms, 3)} per pixel on the 0–1 scale"
    )
    if not np.isfinite(ratio):
        return said + "). The film strips of the run's report show what the images look like."
    noun = classes.noun
    said += f"; {fmt_pct(ratio, 0)} of the median {noun} start's own L2 norm of {fmt_num(start_norm, 1)})"
    if ratio < 0.5:
        return said + f" — a change that small leaves the start in place: expect the images to still look like their start {noun} (see the film strips)."
    if ratio < 1.0:
        return said + f" — a sizeable change: the film strips show whether the images still look like their start {noun}."
    return (
        said + f" — as large as the {classes.title} images themselves: the pixels were rewritten; the film strips show whether into "
        f"{classes.with_article(target)} or into scribbles."
    )


def model_facts(run: Run) -> list[tuple[str, str]]:
    """The classifier as (label, value) rows: architecture, input, training, images, error, time, model file."""
    model, train = run.record.model, run.record.config.train
    spec, metrics = model.spec, model.metrics
    facts = [
        ("architecture", str(spec.get("arch", train.arch))),
        ("input", f"{spec.get('channels', train.channels)} channel(s), normalisation {spec.get('normalize', train.normalize)}"),
        ("training", f"{metrics.get('epochs', train.epochs)} epochs, lr {train.lr}, batch {train.batch_size}, "
         f"pretrained {_yes(train.pretrained)}, fine-tune {_yes(train.fine_tune)}"),
        ("images", f"{fmt_int(metrics.get('n_train'))} training, {fmt_int(metrics.get('n_valid'))} validation"),
        ("validation error", fmt_pct(metrics.get("valid_error"), 2)),
        ("training time", f"{fmt_num(metrics.get('train_seconds'), 1)} s"),
        ("model file", f"{model.path} (sha256 {model.sha256[:12]})"),
    ]
    return facts


def run_facts(run: Run) -> list[tuple[str, str]]:
    """The run as (label, value) rows: where, when, which version and device, which starts, method and dataset."""
    a, rec = run.attack, run.record
    digits, classes = a.start_digits, classes_of(run)
    return [
        ("run", f"{run.name} ({run.path})"),
        ("created", rec.created.isoformat()),
        ("version / commit", f"{rec.version} / {rec.git_commit or 'unknown'}"),
        ("device / attack time", f"{rec.device} / {fmt_num(rec.attack_seconds, 1)} s"),
        ("dataset / target", f"{classes.title} ({rec.config.dataset.name}); target {classes.label(run.target)} vs every other {classes.noun}"),
        ("starts", f"{classes.nouns} {', '.join(classes.name_of(d) for d in digits) if digits else '—'}; noise {_yes(a.include_noise)} ({a.noise}); {a.seeds} seeds"),
        ("method", f"{a.method}, loss {loss_name(a)}, lr {step_size(a)}{' (default)' if a.lr is None else ''}, "
         f"eps {a.eps if a.eps is not None else '—'}, {a.steps} steps, record every {a.record_every}, "
         f"early stop {a.early_stop if a.early_stop is not None else 'off'}"),
        ("dataset", f"{rec.dataset.path} (sha256 {rec.dataset.sha256[:12]})"),
    ]


def _ci(a: pd.Series, key: str) -> str:
    """A summary row's share with its exact 95% interval, e.g. "12.5% (95% CI 3–29%)"."""
    return f"{fmt_pct(a[key])} (95% CI {fmt_pct(a[key + '_lo'], 0)}–{fmt_pct(a[key + '_hi'], 0)})"


def _yes(flag) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def warnings_of(run: Run) -> list[dict]:
    """Artefacts worth flagging: dead-unit collapse, saturated starts, pixels outside [0, 1], starts already at target."""
    a = run.table[run.table["group"] == ALL].iloc[0]
    out = []
    plabel, target_name = plabel_of(run), classes_of(run).name_of(run.target)
    succ = int(a["successes"])
    out.extend(_collapse_warnings(a, target_name))
    if succ and a["grad_zero_success_share"] >= 0.5:
        zero = round(a["grad_zero_success_share"] * succ)
        out.append(
            {
                "level": "warning",
                "id": "warn-dead-units",
                "text": f"{zero} of {succ} successes ({_ci(a, 'grad_zero_success_share')}) end with an exactly zero input "
                "gradient. That is the signature of dead-unit collapse: a large step silenced every active unit and the "
                "logits fell back to the biases, which happen to favour the target. These flips say little about the images.",
            }
        )
    elif succ and a["grad_zero_success_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-dead-units",
                "text": f"{_ci(a, 'grad_zero_success_share')} of successes end with an exactly zero input gradient "
                "(possible dead-unit collapse for those starts).",
            }
        )
    failures = a["n"] - succ
    loss = loss_name(run.attack)
    if failures and a["saturated_failure_share"] >= 0.5 and loss in ("l1_softmax", "?"):
        out.append(
            {
                "level": "warning",
                "id": "warn-saturated",
                "text": f"{_ci(a, 'saturated_failure_share')} of the failures started with {plabel} within "
                f"{stats.SATURATED_P:g} of 0 or 1: a loss on the softmax probability has a gradient proportional to p(1 - p), so these "
                "starts barely move. Relate success to the starting probability before reading it as robustness.",
            }
        )
    if a["outside_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-outside",
                "text": f"{_ci(a, 'outside_share')} of the final images have pixels outside [0, 1] (the method does not "
                "clamp). Images in this report are clipped to [0, 1] for display; norms use the unclipped values.",
            }
        )
    if a["start_is_target_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-start-target",
                "text": f"{_ci(a, 'start_is_target_share')} of the starts were already classified as {target_name} "
                f"({plabel} ≥ 0.5) before any step.",
            }
        )
    return out


def _collapse_warnings(a: pd.Series, target: str) -> list[dict]:
    """Dead-unit collapse measured at the final images (collapse_final): flips the image no longer causes."""
    n, succ = int(a["n"]), int(a["successes"])
    collapsed = round(a.get("collapse_share", 0.0) * n) if n else 0
    if not collapsed:
        return []
    in_success = round(a["collapse_success_share"] * succ) if succ else 0
    return [
        {
            "level": "warning" if in_success else "note",
            "id": "warn-collapse",
            "text": f"Dead-unit collapse: at the final image of {collapsed} of {n} starts every input of the detector's last "
            f"linear layer is zero, so its logits are just that layer's bias and no longer depend on the image. "
            f"{in_success} of the {succ} successes ({_ci(a, 'collapse_success_share')}) were reached this way "
            f"(the bias favours {target}): those flips say nothing about what the image looks like.",
        }
    ]


def dataset_table(run: Run) -> dict:
    """Image counts per class and split of the run's dataset, with totals per split and the manifest (rows: index "digit",
    class name "name")."""
    manifest = run.record.dataset.manifest
    counts = manifest.get("counts") or {}
    if counts and all(str(k).isdigit() for k in counts):  # {digit: {split: n}} -> {split: {digit: n}}
        flipped: dict[str, dict] = {}
        for d, per in counts.items():
            for split, n in (per or {}).items():
                flipped.setdefault(split, {})[str(d)] = n
        counts = flipped
    known = [s for s in ("train", "valid", "pool") if s in counts]
    splits = known + [s for s in counts if s not in known]
    digits = sorted({str(d) for per in counts.values() for d in (per or {})}, key=lambda d: int(d) if d.isdigit() else 99)
    classes = classes_of(run)
    rows = [
        {"digit": d, "name": classes.name_of(d) if d.isdigit() and int(d) < 10 else d, "counts": [(counts[s] or {}).get(d) for s in splits]}
        for d in digits
    ]
    totals = [sum(int(v) for v in (counts[s] or {}).values()) for s in splits]
    return {"splits": splits, "rows": rows, "totals": totals, "manifest": manifest}
