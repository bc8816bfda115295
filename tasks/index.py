"""The runs index after a run: the finished run's version appended to the runs folder's history, index.html rewritten."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="refresh-runs-index", cache_policy=NO_CACHE)
def refresh_runs_index(runs_root: Path) -> Path | None:
    """Record the runs folder's new versions and rewrite its index.html; a failure only warns (the run itself is done)."""
    from reports.index_page import refresh_index

    try:
        return refresh_index(Path(runs_root))
    except Exception as exc:  # noqa: BLE001  the index is a convenience: it never fails a run
        get_run_logger().warning("runs index of %s not refreshed: %s: %s", runs_root, type(exc).__name__, exc)
        return None
