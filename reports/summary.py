"""A run's key numbers for Prefect artifacts: a Markdown summary and the per-digit table.

Kept free of matplotlib so a cached pipeline run can publish them without loading it.
"""

from __future__ import annotations

from reports.formatting import fmt_num, fmt_pct, fmt_step, table_rows
from reports.narrative import classes_of, headline, plabel_of, warnings_of
from reports.runs import Run


def digit_table(run: Run) -> list[dict]:
    """Per start group summary rows (noise, classes, then "all"), JSON-safe, for a table artifact; "name" is the class name."""
    classes = classes_of(run)
    return [{"name": r["group"] if r["group"] in ("noise", "all") else classes.name_of(r["group"]), **r} for r in table_rows(run.table)]


def _md(text: object) -> str:
    """Text safe inside Markdown: HTML and Markdown control characters escaped."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return s


def summary_markdown(run: Run) -> str:
    """The run's key numbers as Markdown, for a markdown artifact."""
    h = headline(run)
    a = h["all"]
    plabel, classes = plabel_of(run), classes_of(run)
    lines = [
        f"## {_md(run.name)}",
        "",
        f"- **data** {_md(classes.title)}, target {_md(classes.label(run.target))}",
        f"- **method** {_md(h['method'])} (loss {_md(h['loss'])}, lr {_md(h['lr'] if h['lr'] is not None else 'default')}, "
        f"eps {_md(h['eps'] if h['eps'] is not None else '—')}), {h['steps']} steps, {h['n']:,} start{'s' if h['n'] != 1 else ''} on {_md(h['device'])}",
        f"- **model** {_md(h['arch'])}, validation error {fmt_pct(h['valid_error'], 2)}",
        f"- **success** {a['successes']:,} / {a['n']:,} = {fmt_pct(a['success_rate'])} "
        f"(exact 95% CI {fmt_pct(a['success_lo'])}–{fmt_pct(a['success_hi'])})",
        f"- **median flip step** {fmt_step(a['flip_median'])} (flipped starts; {fmt_pct(a['censored_share'])} never flipped, "
        f"95% CI {fmt_pct(a['censored_share_lo'])}–{fmt_pct(a['censored_share_hi'])})",
        f"- **median L2 at flip** {fmt_num(a['l2_flip_median'])}, final {fmt_num(a['l2_final_median'])} (pixel units, [0, 1] scale)",
        f"- **{_md(plabel)} crossed 0.5** for {fmt_pct(h['crossed_share'])} of starts (95% CI {fmt_pct(h['crossed_lo'])}–"
        f"{fmt_pct(h['crossed_hi'])}) after a median of {fmt_step(h['crossed_median'])} steps",
    ]
    for w in warnings_of(run):
        if w["level"] == "warning":
            lines.append(f"- **warning** {_md(w['text'])}")
    return "\n".join(lines) + "\n"
