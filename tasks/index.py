"""The runs index after a run: the finished run's version appended to the runs folder's history, index.html rewritten.

A plain call at the end of a flow, not a task: it is never cached, and every run's task states stay what they were.
"""

from __future__ import annotations

import logging
from pathlib import Path

from eightgen.store import is_url


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()  # the flow run's log, so the warning shows in the UI
    except MissingContextError:
        return logging.getLogger("eightgen")


def refresh_runs_index(runs_root: Path) -> Path | None:
    """Record the runs folder's new versions and rewrite its index.html; a failure only warns (the run itself is done).

    A runs folder in a store has no index.html (its history needs a lock the store cannot give): `eightgen runs` lists it."""
    if is_url(runs_root):
        return None
    try:
        from reports.index_page import refresh_index

        return refresh_index(Path(runs_root))
    except Exception as exc:  # noqa: BLE001  the index is a convenience: it never fails a run
        _logger().warning("runs index of %s not refreshed: %s: %s", runs_root, type(exc).__name__, exc)
        return None
