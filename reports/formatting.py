"""Numbers as report text: fixed decimals, percentages, probabilities, steps, and JSON-safe values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _nan(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def fmt_num(x, digits: int = 2) -> str:
    """A number with fixed decimals, an em dash when missing."""
    return "—" if _nan(x) else f"{float(x):,.{digits}f}"


def fmt_pct(x, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage."""
    return "—" if _nan(x) else f"{100 * float(x):.{digits}f}%"


def fmt_bracket(share: dict | None, bound_digits: int = 0) -> str:
    """A share (one decimal) with its 95% interval in brackets, e.g. "98.1% [94–100]"; "—" for none."""
    if not share:
        return "—"
    return f"{100 * share['share']:.1f}% [{100 * share['lo']:.{bound_digits}f}–{100 * share['hi']:.{bound_digits}f}]"


def fmt_share(share: dict | None) -> str:
    """A share with its 95% interval and counts, e.g. "98.1% [93.5–99.8], 106 of 108"; "—" for none."""
    if share is None or _nan(share["share"]):
        return "—"
    return f"{fmt_bracket(share, 1)}, {share['k']} of {share['n']}"


NEEDS = {">=": "lower bound ≥ ", "<=": "upper bound ≤ ", "in": "interval holds ", "within": "interval inside "}


def target_line(t: dict) -> str:
    """A judged target as one line: met or MISSED, what it asks, the value, what its bound needs, and the margin."""
    if t.get("unit", "share") == "share":
        value = fmt_share({**t, "share": t["value"]})
        need = NEEDS[t["op"]] + f"{100 * t['threshold']:.0f}%" + (f"–{100 * t['threshold_hi']:.0f}%" if t["op"] == "within" else "")
        margin = f"{100 * t['margin']:+.1f} points"
    else:
        value, need, margin = f"{t['value']:.1f}", f"≤ {t['threshold']:.1f}", f"{t['margin']:+.1f}"
    return f"  {'met   ' if t['met'] else 'MISSED'} {t['what']}: {value} (needs {need}, margin {margin})"


def fmt_ci(share: dict | None, digits: int = 1) -> str:
    """A share with its 95% interval in prose, e.g. "98.1% (95% CI 93–100%, 106 of 108)"; "—" for none."""
    if share is None or _nan(share["share"]):
        return "—"
    return f"{fmt_pct(share['share'], digits)} (95% CI {100 * share['lo']:.0f}–{100 * share['hi']:.0f}%, {share['k']} of {share['n']})"


def fmt_prob(x) -> str:
    """A probability: three decimals, scientific notation below 0.001."""
    if _nan(x):
        return "—"
    x = float(x)
    return f"{x:.1e}" if 0 < x < 1e-3 else f"{x:.3f}"


def fmt_step(x) -> str:
    """A step number (medians may fall between steps)."""
    if _nan(x):
        return "—"
    x = float(x)
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def fmt_scale(x) -> str:
    """A colour-scale bound with two significant digits."""
    return "—" if _nan(x) else f"{float(x):.2g}"


def fmt_int(x) -> str:
    """An integer with thousands separators."""
    return "—" if _nan(x) else f"{int(x):,}"


def fmt_raw(x) -> str:
    """A number at full precision for a data-value attribute ("nan" when missing)."""
    return "nan" if _nan(x) else repr(float(x))


def json_safe(x):
    """A plain Python value for JSON and the templates: None for missing, int/float/bool for numpy scalars."""
    if x is None or x is pd.NA:
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def plain_json(value):
    """Nested dicts, lists and tuples with json_safe leaves (string keys): what json.dumps takes."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return json_safe(value)


def table_rows(table: pd.DataFrame) -> list[dict]:
    """A table as JSON-safe row dicts."""
    return [{k: json_safe(v) for k, v in r.items()} for r in table.to_dict("records")]
