"""Deliberate faults, for rehearsing retries and crashes: off unless EIGHTGEN_FAIL_ONCE or EIGHTGEN_HOLD_IN is set.

EIGHTGEN_FAIL_ONCE=<task name> (e.g. optimize-chunk) makes the first run of that task raise, and
leaves a marker file (EIGHTGEN_FAIL_ONCE_MARKER, default <tmp>/eightgen-failed-once-<task name>) so
every later run, a retry included, passes. Delete the marker to arm it again.

EIGHTGEN_HOLD_IN=<task name> stops that task in the middle of its work (its output half made, or not yet
written), touches EIGHTGEN_HOLD_MARKER and waits there to be killed: a `kill -9` lands in that stage.
EIGHTGEN_HOLD_CHUNK=<i> holds only chunk i of a chunked task (optimize-chunk). A task holds once per marker: while
the marker exists, the task (a retry on another worker, say) goes on.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from prefect.context import TaskRunContext

FAIL_ONCE = "EIGHTGEN_FAIL_ONCE"
FAIL_ONCE_MARKER = "EIGHTGEN_FAIL_ONCE_MARKER"
HOLD_IN, HOLD_MARKER, HOLD_CHUNK = "EIGHTGEN_HOLD_IN", "EIGHTGEN_HOLD_MARKER", "EIGHTGEN_HOLD_CHUNK"
HOLD_SECONDS = 600  # then give up waiting and go on


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


def hold(chunk: int | None = None) -> None:
    """Inside a task: if EIGHTGEN_HOLD_IN names this task (and EIGHTGEN_HOLD_CHUNK, if set, this chunk), write this
    process's pid to EIGHTGEN_HOLD_MARKER and wait (to be killed or stopped)."""
    name, at = os.environ.get(HOLD_IN), os.environ.get(HOLD_CHUNK)
    ctx = TaskRunContext.get()
    if not name or ctx is None or ctx.task.name != name or (at is not None and chunk is not None and int(at) != chunk):
        return
    marker = Path(os.environ.get(HOLD_MARKER) or Path(tempfile.gettempdir()) / f"eightgen-held-in-{name}")
    if marker.exists():  # held once already: a retry (another worker's) goes on
        return
    marker.write_text(str(os.getpid()))  # the process holding: a test may kill it (a Dask worker, say)
    time.sleep(HOLD_SECONDS)
