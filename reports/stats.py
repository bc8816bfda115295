"""Summary statistics of a results frame: exact intervals of shares, Kaplan-Meier curves with bands, per-start-group tables."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

NOISE = "noise"
ALL = "all"
# Within this of 0 or 1, p(target) leaves the softmax almost no gradient (as eightgen.attack.metrics.SATURATED).
SATURATED_P = 1e-6
LEVEL = 0.95


def as_float(values: pd.Series | np.ndarray) -> np.ndarray:
    """A float64 array with NaN for missing values (pandas nullable types included)."""
    if isinstance(values, pd.Series):
        return values.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    return np.asarray(values, dtype=float)


def as_bool(values: pd.Series | np.ndarray) -> np.ndarray:
    """A bool array, missing values read as False."""
    if isinstance(values, pd.Series):
        return values.astype("boolean").fillna(False).to_numpy(dtype=bool)
    return np.asarray(values, dtype=bool)


def group_labels(results: pd.DataFrame) -> pd.Series:
    """The start group of every row: "noise" for noise starts, else the start digit as text ("0".."9")."""
    digit = as_float(results["start_digit"])
    noise = (results["start_kind"].astype(str) == NOISE).to_numpy() | np.isnan(digit)
    labels = np.where(noise, NOISE, np.nan_to_num(digit, nan=-1).astype(int).astype(str))
    return pd.Series(labels, index=results.index, name="group")


def group_order(labels: Iterable[str]) -> list[str]:
    """Groups in display order: noise first, then digits ascending."""
    unique = set(labels)
    digits = sorted((g for g in unique if g != NOISE), key=int)
    return ([NOISE] if NOISE in unique else []) + digits


def stable_seed(label: str, base: int = 0) -> int:
    """A per-label RNG seed that does not depend on which other labels exist."""
    return base + zlib.crc32(label.encode())


def rate_ci(successes: int, n: int, *, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a share successes/n; never zero-width for n > 0, (NaN, NaN) for n = 0."""
    if n == 0:
        return (np.nan, np.nan)
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def counted_share(k: int, n: int, *, level: float = LEVEL) -> dict:
    """k of n as a share with its exact interval: {"share", "lo", "hi", "k", "n"}."""
    lo, hi = rate_ci(k, n, level=level)
    return {"share": k / n if n else np.nan, "lo": lo, "hi": hi, "k": int(k), "n": int(n)}


def share_ci(flags: np.ndarray | pd.Series, *, level: float = LEVEL) -> dict:
    """The share of true flags with its exact interval: {"share", "lo", "hi", "k", "n"} (missing flags read as False)."""
    flags = as_bool(flags) if isinstance(flags, pd.Series) else np.asarray(flags, dtype=bool)
    return counted_share(int(flags.sum()), int(flags.size), level=level)


def at_least(share: dict, threshold: float) -> bool:
    """Whether a share is shown to be at least the threshold: its interval's lower bound meets it."""
    return bool(np.isfinite(share["lo"]) and share["lo"] >= threshold)


def at_most(share: dict, threshold: float) -> bool:
    """Whether a share is shown to be at most the threshold: its interval's upper bound meets it."""
    return bool(np.isfinite(share["hi"]) and share["hi"] <= threshold)


def judged(key: str, what: str, share: dict, op: str, threshold: float) -> dict:
    """A share's target judged on its exact interval: "≥ t" is met when the lower bound is ≥ t, "≤ t" when the upper bound is ≤ t."""
    bound = share["lo"] if op == ">=" else share["hi"]
    margin = bound - threshold if op == ">=" else threshold - bound
    return {"key": key, "what": what, "value": share["share"], "lo": share["lo"], "hi": share["hi"], "n": share["n"], "k": share["k"],
            "bound": bound, "op": op, "threshold": threshold, "met": bool(np.isfinite(margin) and margin >= 0), "margin": margin, "unit": "share"}


def _km_fit(event_step: np.ndarray, observed: np.ndarray, horizon: int) -> tuple[np.ndarray, Any]:
    """Steps 0..horizon and scipy's Kaplan-Meier fit (unflipped starts right-censored at their last step: watched through
    it); instead of a fit, the curve's constant value where there is nothing to fit (NaN: no starts; 1: none flipped)."""
    t = np.asarray(event_step, dtype=float)
    observed = np.asarray(observed, dtype=bool)
    steps = np.arange(horizon + 1, dtype=float)
    if t.size == 0:
        return steps, np.nan
    if not observed.any():
        return steps, 1.0
    return steps, sps.ecdf(sps.CensoredData(uncensored=t[observed], right=t[~observed]))


def kaplan_meier(event_step: np.ndarray, observed: np.ndarray, horizon: int) -> np.ndarray:
    """Share of starts not yet flipped at steps 0..horizon (Kaplan-Meier; unflipped starts censored at their last step)."""
    steps, fit = _km_fit(event_step, observed, horizon)
    return np.full(len(steps), fit) if isinstance(fit, float) else fit.sf.evaluate(steps)


def survival_band(event_step: np.ndarray, observed: np.ndarray, horizon: int, *, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Kaplan-Meier curve of kaplan_meier and its pointwise band (scipy.stats.ecdf, log-log Greenwood).

    Where the band is undefined (the curve at 0 or 1) it is the curve itself."""
    steps, fit = _km_fit(event_step, observed, horizon)
    if isinstance(fit, float):
        curve = np.full(len(steps), fit)
        return curve, curve.copy(), curve.copy()
    curve = fit.sf.evaluate(steps)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined at 0 and 1, filled below
        ci = fit.sf.confidence_interval(confidence_level=level, method="log-log")
        lo, hi = ci.low.evaluate(steps), ci.high.evaluate(steps)
    return curve, np.where(np.isfinite(lo), lo, curve), np.where(np.isfinite(hi), hi, curve)


def _event_times(results: pd.DataFrame, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    flip = as_float(results["flip_step"])
    observed = ~np.isnan(flip)
    steps = as_float(results["steps"]) if "steps" in results else np.full(len(results), float(horizon))
    when = np.where(observed, flip, steps)
    return np.nan_to_num(when, nan=horizon), observed


def survival_of(results: pd.DataFrame, horizon: int) -> np.ndarray:
    """Kaplan-Meier 'not yet flipped' curve of a results frame (censored at each row's steps)."""
    return kaplan_meier(*_event_times(results, horizon), horizon)


def survival_band_of(results: pd.DataFrame, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kaplan-Meier 'not yet flipped' curve of a results frame with its 95% band: (curve, lo, hi)."""
    return survival_band(*_event_times(results, horizon), horizon)


def km_median(curve: np.ndarray) -> float:
    """First step at which the survival curve is at or below one half; NaN if never."""
    below = np.flatnonzero(curve <= 0.5)
    return float(below[0]) if below.size else np.nan


def quantile_bands(p: np.ndarray, labels: np.ndarray, order: list[str], qs: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, np.ndarray]:
    """Per group, the quantiles qs over starts of p [n, T] at every step: {group: array [len(qs), T]}."""
    return {g: np.quantile(p[labels == g], qs, axis=0) for g in order if np.any(labels == g)}


def _q(values: np.ndarray, q: float) -> float:
    values = values[~np.isnan(values)]
    return float(np.quantile(values, q)) if values.size else np.nan


def _share(mask: np.ndarray, among: np.ndarray | None = None) -> dict:
    return share_ci(mask[among] if among is not None else mask)


def _with_interval(name: str, share: dict) -> dict:
    """A share as summary-row columns: name, name_lo, name_hi (exact 95% interval)."""
    return {name: share["share"], f"{name}_lo": share["lo"], f"{name}_hi": share["hi"]}


def indicators(results: pd.DataFrame) -> pd.DataFrame:
    """Per-start failure indicators: grad_zero_final, saturated_start, outside_01, collapse_final (from the results where recorded)."""
    n = len(results)
    p_start = as_float(results["p_target_start"])
    if "grad_zero_final" in results:
        grad_zero = as_bool(results["grad_zero_final"])
    else:
        grad_zero = (as_float(results["grad_norm_final"]) if "grad_norm_final" in results else np.full(n, np.nan)) == 0.0
    if "saturated_start" in results:
        saturated = as_bool(results["saturated_start"])
    else:
        saturated = (p_start < SATURATED_P) | (p_start > 1 - SATURATED_P)
    outside = as_float(results["frac_outside_01"]) if "frac_outside_01" in results else np.full(n, np.nan)
    # Dead-unit collapse is measured with the model; runs without the column (or null values) count as not collapsed.
    collapse = as_bool(results["collapse_final"]) if "collapse_final" in results else np.zeros(n, bool)
    return pd.DataFrame(
        {"grad_zero_final": grad_zero, "saturated_start": saturated, "outside_01": outside > 0.0, "collapse_final": collapse},
        index=results.index,
    )


def summarise(results: pd.DataFrame, label: str) -> dict:
    """One summary row for a set of starts: shares with exact 95% intervals (`_lo`, `_hi`), flip steps, norms, indicators."""
    success = as_bool(results["success"])
    flip = as_float(results["flip_step"])
    flipped = ~np.isnan(flip)
    censored = as_bool(results["censored"]) if "censored" in results else ~flipped
    ind = {k: v.to_numpy() for k, v in indicators(results).items()}
    l2_flip = as_float(results["l2_at_flip"])
    l2_final = as_float(results["l2_final"])
    horizon = int(np.nanmax(as_float(results["steps"]))) if len(results) else 0
    stays = as_bool(results["stays_flipped"]) if "stays_flipped" in results else np.zeros(len(results), bool)
    shares = {
        "success_rate": _share(success),
        "censored_share": _share(censored),
        "stays_flipped_share": _share(stays, flipped),
        "grad_zero_share": _share(ind["grad_zero_final"]),
        "grad_zero_success_share": _share(ind["grad_zero_final"], success),
        "saturated_share": _share(ind["saturated_start"]),
        "saturated_failure_share": _share(ind["saturated_start"], ~success),
        "outside_share": _share(ind["outside_01"]),
        "collapse_share": _share(ind["collapse_final"]),
        "collapse_success_share": _share(ind["collapse_final"], success),
        "start_is_target_share": _share(as_float(results["p_target_start"]) >= 0.5),
    }
    row = {
        "group": label,
        "n": int(len(results)),
        "successes": int(success.sum()),
        "flipped": int(flipped.sum()),
        "flip_median": _q(flip, 0.5),
        "flip_km_median": km_median(survival_of(results, horizon)) if len(results) else np.nan,
        "l2_flip_median": _q(l2_flip, 0.5),
        "l2_flip_q25": _q(l2_flip, 0.25),
        "l2_flip_q75": _q(l2_flip, 0.75),
        "l2_final_median": _q(l2_final, 0.5),
        "l2_final_q25": _q(l2_final, 0.25),
        "l2_final_q75": _q(l2_final, 0.75),
        "linf_final_median": _q(as_float(results["linf_final"]), 0.5),
        "p_start_median": _q(as_float(results["p_target_start"]), 0.5),
        "p_final_median": _q(as_float(results["p_target_final"]), 0.5),
    }
    for name, share in shares.items():
        row |= _with_interval(name, share)
    row["success_lo"], row["success_hi"] = row.pop("success_rate_lo"), row.pop("success_rate_hi")
    return row


def group_table(results: pd.DataFrame) -> pd.DataFrame:
    """One summary row per start group (noise, then digits) and a last row "all"."""
    labels = group_labels(results)
    rows = [summarise(results[labels == g], g) for g in group_order(labels)]
    rows.append(summarise(results, ALL))
    return pd.DataFrame(rows)
