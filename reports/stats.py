"""Summary statistics of a results frame: bootstrap intervals, Kaplan-Meier curves, per-start-group tables."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

NOISE = "noise"
ALL = "all"
# Within this of 0 or 1, p(target) leaves the softmax almost no gradient (as eightgen.metrics.SATURATED).
SATURATED_P = 1e-6
LEVEL = 0.95
N_BOOT = 4000


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


def bootstrap_rate_ci(success: np.ndarray, *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a success rate (starts resampled with replacement, fixed RNG)."""
    success = np.asarray(success, dtype=bool)
    n = success.size
    if n == 0:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    # The mean of n outcomes resampled with replacement from the observed ones is Binomial(n, rate) / n.
    draws = rng.binomial(n, success.mean(), size=n_boot) / n
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def kaplan_meier(event_step: np.ndarray, observed: np.ndarray, horizon: int) -> np.ndarray:
    """Share of starts not yet flipped at steps 0..horizon (Kaplan-Meier; unflipped starts censored at their last step)."""
    t = np.clip(np.asarray(event_step, dtype=np.int64), 0, horizon + 1)
    observed = np.asarray(observed, dtype=bool)
    if t.size == 0:
        return np.full(horizon + 1, np.nan)
    events = np.bincount(t[observed], minlength=horizon + 2)[: horizon + 1]
    censored = np.bincount(t[~observed], minlength=horizon + 2)[: horizon + 1]
    # At risk at s: everyone not flipped and not censored before s (a start censored at s was watched through s).
    left_before = np.concatenate([[0], np.cumsum(events + censored)[:-1]])
    at_risk = t.size - left_before
    hazard = np.divide(events, at_risk, out=np.zeros(horizon + 1), where=at_risk > 0)
    return np.cumprod(1.0 - hazard)


def survival_of(results: pd.DataFrame, horizon: int) -> np.ndarray:
    """Kaplan-Meier 'not yet flipped' curve of a results frame (censored at each row's steps)."""
    flip = as_float(results["flip_step"])
    observed = ~np.isnan(flip)
    steps = as_float(results["steps"]) if "steps" in results else np.full(len(results), float(horizon))
    when = np.where(observed, flip, steps)
    return kaplan_meier(np.nan_to_num(when, nan=horizon).astype(np.int64), observed, horizon)


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


def _share(mask: np.ndarray, among: np.ndarray | None = None) -> float:
    if among is not None:
        mask = mask[among]
    return float(mask.mean()) if mask.size else np.nan


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


def summarise(results: pd.DataFrame, label: str, *, seed: int = 0) -> dict:
    """One summary row for a set of starts: rates, bootstrap interval, flip steps, norms, indicator shares."""
    success = as_bool(results["success"])
    flip = as_float(results["flip_step"])
    flipped = ~np.isnan(flip)
    censored = as_bool(results["censored"]) if "censored" in results else ~flipped
    ind = indicators(results)
    lo, hi = bootstrap_rate_ci(success, seed=stable_seed(label, seed))
    l2_flip = as_float(results["l2_at_flip"])
    l2_final = as_float(results["l2_final"])
    horizon = int(np.nanmax(as_float(results["steps"]))) if len(results) else 0
    stays = as_bool(results["stays_flipped"]) if "stays_flipped" in results else np.zeros(len(results), bool)
    return {
        "group": label,
        "n": int(len(results)),
        "successes": int(success.sum()),
        "success_rate": _share(success),
        "success_lo": lo,
        "success_hi": hi,
        "flipped": int(flipped.sum()),
        "flip_median": _q(flip, 0.5),
        "flip_km_median": km_median(survival_of(results, horizon)) if len(results) else np.nan,
        "censored_share": _share(censored),
        "stays_flipped_share": _share(stays, flipped),
        "l2_flip_median": _q(l2_flip, 0.5),
        "l2_flip_q25": _q(l2_flip, 0.25),
        "l2_flip_q75": _q(l2_flip, 0.75),
        "l2_final_median": _q(l2_final, 0.5),
        "l2_final_q25": _q(l2_final, 0.25),
        "l2_final_q75": _q(l2_final, 0.75),
        "linf_final_median": _q(as_float(results["linf_final"]), 0.5),
        "p_start_median": _q(as_float(results["p_target_start"]), 0.5),
        "p_final_median": _q(as_float(results["p_target_final"]), 0.5),
        "grad_zero_share": _share(ind["grad_zero_final"].to_numpy()),
        "grad_zero_success_share": _share(ind["grad_zero_final"].to_numpy(), success),
        "saturated_share": _share(ind["saturated_start"].to_numpy()),
        "saturated_failure_share": _share(ind["saturated_start"].to_numpy(), ~success),
        "outside_share": _share(ind["outside_01"].to_numpy()),
        "collapse_share": _share(ind["collapse_final"].to_numpy()),
        "collapse_success_share": _share(ind["collapse_final"].to_numpy(), success),
        "start_is_target_share": _share(as_float(results["p_target_start"]) >= 0.5),
    }


def group_table(results: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """One summary row per start group (noise, then digits) and a last row "all"."""
    labels = group_labels(results)
    rows = [summarise(results[labels == g], g, seed=seed) for g in group_order(labels)]
    rows.append(summarise(results, ALL, seed=seed))
    return pd.DataFrame(rows)
