"""index.html at the root of a runs folder: every run and experiment with its headline share, the trend of each name
over its recorded versions, and the comparison of selected runs. The one writer of index.html and of the history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from eightgen.artifacts import write_text_atomically
from eightgen.errors import EightgenError
from eightgen.rundir import is_run_dir
from reports.files import INDEX
from reports.formatting import fmt_pct, fmt_share, fmt_step
from reports.history import HISTORY, Version, append_new, locked, parse, trends
from reports.index import Entry, scan

SPARK_W, SPARK_H, SPARK_PAD = 240, 64, 6
COMPARE_NAME_MAX = 150  # longer joined names fall back to a hash (file names stop at 255 bytes)


@cache
def environment() -> Environment:
    """The jinja environment of the index page (without the run report's figure code)."""
    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(share=lambda s: fmt_share(s.model_dump() if s is not None else None), pct=fmt_pct, step=fmt_step)
    return env


def short(sha: str | None, n: int = 8) -> str:
    """The first characters of a hash, "—" for none."""
    return sha[:n] if sha else "—"


def sparkline(versions: Sequence[Version]) -> dict:
    """Coordinates of a trend: one point per version (evenly spaced, oldest left) with its interval as a whisker, share 0-1 up."""
    n = len(versions)
    step = (SPARK_W - 2 * SPARK_PAD) / max(n - 1, 1)

    def y(v: float) -> float:
        return round(SPARK_H - SPARK_PAD - v * (SPARK_H - 2 * SPARK_PAD), 1)

    points = []
    for i, v in enumerate(versions):
        if v.share is None:
            continue
        points.append({"x": round(SPARK_PAD + i * step, 1), "y": y(v.share.share), "lo": y(v.share.lo), "hi": y(v.share.hi),
                       "title": f"{v.when:%Y-%m-%d %H:%M}: {fmt_share(v.share.model_dump())}"})
    return {"w": SPARK_W, "h": SPARK_H, "points": points, "line": " ".join(f"{p['x']},{p['y']}" for p in points),
            "grid": [{"y": y(g), "label": f"{g:.0%}"} for g in (0.0, 0.5, 1.0)]}


def compare_name(names: Sequence[str]) -> str:
    """The file name of the comparison of these runs: compare-a--b.html (a hash when that would be too long)."""
    joined = "--".join(names)
    return f"compare-{joined if len(joined) <= COMPARE_NAME_MAX else hashlib.sha256(joined.encode()).hexdigest()[:16]}.html"


def _trend_rows(name: str, versions: list[Version]) -> dict:
    rows = []
    for before, v in zip([None, *versions], versions):
        changed = []
        if before is not None:
            changed = [label for label, a, b in (("model", before.model_sha256, v.model_sha256), ("data", before.dataset_sha256, v.dataset_sha256),
                                                  ("code", before.git_commit, v.git_commit)) if a != b]
        rows.append({"v": v, "changed": ", ".join(changed) or ("—" if before is None else "results only")})
    return {"name": name, "headline": versions[-1].headline, "spark": sparkline(versions), "rows": rows}


def index_context(root: Path, entries: list[Entry], versions: list[Version], bad_lines: list) -> dict:
    """Everything index.html shows."""
    runs = [e for e in entries if e.kind != "unreadable"]
    return {
        "title": f"eightgen runs: {Path(root).resolve().name}",
        "root": str(root),
        "runs": runs,
        "unreadable": [e for e in entries if e.kind == "unreadable"],
        "bad_lines": bad_lines,
        "history": HISTORY,
        "trends": [_trend_rows(n, vs) for n, vs in trends(versions).items()],
        "short": short,
        "compare_max": COMPARE_NAME_MAX,
    }


def index_html(root: Path, entries: list[Entry], versions: list[Version], bad_lines: list) -> str:
    """The self-contained index page."""
    return environment().get_template("index.html.j2").render(**index_context(root, entries, versions, bad_lines))


def refresh_index(root: Path) -> Path:
    """Record every run version not yet in the history, then rewrite index.html; all under the history's lock, so
    concurrent runs never interleave lines and the last page written is the newest view."""
    root = Path(root)
    if not root.is_dir():
        raise EightgenError(f"no runs folder at {root}")
    with locked(root) as f:
        entries = scan(root)
        append_new(f, [v for e in entries if (v := e.as_version()) is not None])
        f.seek(0)
        versions, bad = parse(f.read().splitlines())
        target = root / INDEX
        write_text_atomically(target, index_html(root, entries, versions, bad))
    return target


def run_dirs_named(root: Path, names: Sequence[str]) -> list[Path]:
    """The run directories of these names directly under root (EightgenError for anything else, path tricks included)."""
    root = Path(root).resolve()
    if len(names) < 2:
        raise EightgenError("select at least two runs to compare")
    dirs = []
    for name in names:
        path = root / name
        if not name or name.startswith(".") or "/" in name or "\\" in name or path.resolve().parent != root:
            raise EightgenError(f"{name!r} is not a run name in the runs folder")
        if not is_run_dir(path):
            raise EightgenError(f"no run named {name!r} in the runs folder (plain runs only can be compared)")
        dirs.append(path)
    return dirs


def compare_page(root: Path, names: Sequence[str]) -> Path:
    """Render the comparison report of the named runs into the runs folder; return its path."""
    from reports.render import render_report  # loads matplotlib

    dirs = run_dirs_named(root, names)
    return render_report(dirs, out=Path(root).resolve() / compare_name([d.name for d in dirs]))
