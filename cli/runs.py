"""`eightgen runs`: one line per run and experiment in a runs folder, newest first (or the same as JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from eightgen.store import location
from reports.formatting import fmt_share, fmt_step

if TYPE_CHECKING:
    from reports.index import Entry


def add_runs_options(p: argparse.ArgumentParser) -> None:
    """The options of `eightgen runs`."""
    p.add_argument("--runs-root", type=location, default=Path("runs"), help="the runs folder: a path, or a store URL such as s3://bucket/runs (default: runs)")
    p.add_argument("--json", action="store_true", help="print the entries as a JSON list")


def line(e: "Entry", root: Path) -> list[str]:
    """The columns of an entry's line (the report as a path under root)."""
    when = f"{e.when:%Y-%m-%d %H:%M} UTC"
    if e.kind == "unreadable":
        return [e.name, "unreadable", f"{when}: {e.reason}"]
    share = e.share
    headline = f"{e.headline}: {fmt_share(share.model_dump())}" if share else "—"
    return [
        e.name, e.kind, e.dataset or "—", f"target {e.target or '—'}", e.method or "—", f"{e.starts} starts" if e.starts is not None else "—",
        headline, f"median flip step {fmt_step(e.flip_median)}" if e.kind == "run" else "", when, str(root / e.report) if e.report else "no report",
    ]


def runs_command(args: argparse.Namespace) -> int:
    """Print the runs index of a runs folder."""
    from eightgen.rundir import CONFIG, MANIFEST, REPORT, REPORT_MANIFEST, RESULTS, local_runs
    from reports.files import ALIGNED_HTML, ALIGNED_JSON, ALIGNED_MANIFEST, DIFFUSION_HTML, DIFFUSION_JSON
    from reports.index import as_json, scan  # with pandas and scipy: only for this command, not every command's start-up

    # what the index reads of each run and experiment; never their trajectories
    read = (CONFIG, RESULTS, REPORT, ALIGNED_JSON, ALIGNED_HTML, DIFFUSION_JSON, DIFFUSION_HTML)
    entries = scan(local_runs(args.runs_root, (MANIFEST, REPORT_MANIFEST, ALIGNED_MANIFEST), read))
    if args.json:
        print(as_json(entries))
        return 0
    rows = [line(e, args.runs_root) for e in entries]
    # An unreadable line has a name, the kind and then its reason, which sets no column's width.
    widths = [max((len(r[i]) for r in rows if len(r) > i + 1), default=0) for i in range(max((len(r) for r in rows), default=0))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    if not rows:
        print(f"no runs in {args.runs_root}")
    return 0
