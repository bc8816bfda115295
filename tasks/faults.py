"""Deliberate one-off task failures, for rehearsing retries: off unless EIGHTGEN_FAIL_ONCE is set.

EIGHTGEN_FAIL_ONCE=<task name> (e.g. optimize-chunk) makes the first run of that task raise, and
leaves a marker file (EIGHTGEN_FAIL_ONCE_MARKER, default <tmp>/eightgen-failed-once-<task name>) so
every later run, a retry included, passes. Delete the marker to arm it again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect.context import TaskRunContext

FAIL_ONCE = "EIGHTGEN_FAIL_ONCE"
FAIL_ONCE_MARKER = "EIGHTGEN_FAIL_ONCE_MARKER"


class InjectedFailure(RuntimeError):
    """The failure EIGHTGEN_FAIL_ONCE asked for."""


def fail_once() -> None:
    """Inside a task: raise InjectedFailure if EIGHTGEN_FAIL_ONCE names this task and has not fired yet."""
    name = os.environ.get(FAIL_ONCE)
    ctx = TaskRunContext.get()
    if not name or ctx is None or ctx.task.name != name:
        return
    marker = Path(os.environ.get(FAIL_ONCE_MARKER) or Path(tempfile.gettempdir()) / f"eightgen-failed-once-{name}")
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    raise InjectedFailure(f"{FAIL_ONCE}={name}: injected failure (marker {marker})")
