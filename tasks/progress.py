"""Progress of long work: a live bar on a terminal, plain log lines everywhere else.

A stage task opens a meter around its long loop and feeds it counts:

    with meter("training", log=logger.info, unit="batches") as shown:
        train(cfg, ..., batches=shown.update)

On an interactive terminal the meter is a row of one rich progress display shared by the whole process
(chunk tasks in threads each get their own row; a row goes away when its work ends, so its summary log
line takes its place). The display draws on the console Prefect's log handler prints to, so run log
lines appear above the bars instead of through them. Anywhere else (stderr piped or redirected, a dumb
terminal, a Dask worker, a process Prefect started for a deployment run) the meter writes plain lines
through `log`, at each further tenth of the work and no more often than every LINE_INTERVAL seconds;
no control code reaches such a stream.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.theme import Theme

Display = Literal["bar", "lines"]
LINE_INTERVAL = 5.0  # seconds: the least time between two plain progress lines of one meter
LINE_PARTS = 10  # plain lines mark each further tenth of the work
REFRESH_PER_SECOND = 4  # the bars redraw this often (cheap on a 2-core machine)
# The styles a bar is drawn with: Prefect's log console has a theme of its own without them.
BAR_THEME = Theme({name: style for name, style in DEFAULT_STYLES.items() if name.startswith(("bar.", "progress."))})


# ---------------------------------------------------------------- the pure core


def choose_display(interactive: bool, elsewhere: bool) -> Display:
    """A bar only on an interactive terminal of this process; plain lines on workers, in deployment runs, in logs."""
    return "bar" if interactive and not elsewhere else "lines"


def progress_line(label: str, done: int, total: int, unit: str, elapsed: float, detail: str = "") -> str:
    """One plain progress line: what, how far, how long so far and (past the start) about how long to go."""
    pct = 100 * done // total if total else 100
    line = f"{label}: {detail + ', ' if detail else ''}{done}/{total} {unit} ({pct}%), {elapsed:.1f} s"
    if 0 < done < total:
        line += f", ~{elapsed * (total - done) / done:.0f} s left"
    return line


@dataclass
class LinePacer:
    """When a plain line is due: at each further `1/parts` of the total, no sooner than `interval` s after the last."""

    interval: float = LINE_INTERVAL
    parts: int = LINE_PARTS
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    last_part: int = field(init=False, default=0)
    last_line: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.last_line = self.clock()

    def due(self, done: int, total: int) -> bool:
        """Whether `done` of `total` earns a line now (and, if so, count it as written)."""
        part = self.parts * min(done, total) // total if total > 0 else 0
        now = self.clock()
        if part <= self.last_part or now - self.last_line < self.interval:
            return False
        self.last_part, self.last_line = part, now
        return True

    def elapsed(self) -> float:
        return self.clock() - self.started


# ---------------------------------------------------------------- meters


class Meter(Protocol):
    def update(self, done: int, total: int | None = None, detail: str = "") -> None:
        """`done` of `total` units are finished (total: as given when opened, unless given here)."""


class LineMeter:
    """Progress as plain lines through a log function, at the pacer's rate."""

    def __init__(self, label: str, total: int, unit: str, log: Callable[[str], None], pacer: LinePacer) -> None:
        self.label, self.total, self.unit, self.log, self.pacer = label, total, unit, log, pacer

    def update(self, done: int, total: int | None = None, detail: str = "") -> None:
        self.total = total if total is not None else self.total
        if self.pacer.due(done, self.total):
            self.log(progress_line(self.label, done, self.total, self.unit, self.pacer.elapsed(), detail))


class _Board:
    """One live rich Progress per console, shared by every bar of the process: threads add and remove rows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, tuple[Progress, int]] = {}  # id(console) -> (display, rows open)

    def open(self, console: Console) -> Progress:
        with self.lock:
            shown, rows = self.live.get(id(console), (None, 0))
            if shown is None:
                shown = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TaskProgressColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                    refresh_per_second=REFRESH_PER_SECOND,
                    redirect_stdout=False,  # stdout stays the command's own (`report: ...`)
                    redirect_stderr=True,  # stray writes to stderr (warnings) print above the bars
                )
                console.push_theme(BAR_THEME)  # adds the bar styles; the log lines' own styles stay as they are
                shown.start()
            self.live[id(console)] = (shown, rows + 1)
            return shown

    def close(self, console: Console) -> None:
        with self.lock:
            shown, rows = self.live[id(console)]
            if rows > 1:
                self.live[id(console)] = (shown, rows - 1)
                return
            del self.live[id(console)]
            try:
                shown.stop()
            finally:
                console.pop_theme()

    def showing(self) -> int:
        """How many bars are open (all consoles)."""
        with self.lock:
            return sum(rows for _, rows in self.live.values())


BOARD = _Board()


class BarMeter:
    """Progress as one row of the process's live progress display."""

    def __init__(self, label: str, total: int, unit: str, console: Console) -> None:
        self.label, self.total, self.console = label, total, console
        self.shown = BOARD.open(console)
        self.row: TaskID = self.shown.add_task(label, total=total or None, unit=unit)

    def update(self, done: int, total: int | None = None, detail: str = "") -> None:
        self.total = total if total is not None else self.total
        description = f"{self.label}: {detail}" if detail else self.label
        self.shown.update(self.row, completed=done, total=self.total or None, description=description)

    def finish(self) -> None:
        """Show the row full once (the last frame a terminal gets of it)."""
        whole = self.total or 1
        self.shown.update(self.row, completed=whole, total=whole)
        self.shown.refresh()

    def close(self) -> None:
        self.shown.remove_task(self.row)
        BOARD.close(self.console)


# ---------------------------------------------------------------- where we are


def run_console() -> Console:
    """The console Prefect's handler prints run log lines to (so bars and log lines share it), else stderr's."""
    from prefect.logging.handlers import PrefectConsoleHandler

    logger: logging.Logger | None = logging.getLogger("prefect.task_runs")
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                return handler.console
        logger = logger.parent if logger.propagate else None
    return Console(stderr=True)


def elsewhere() -> bool:
    """Whether this code runs away from the command's terminal: a Dask worker, a child process, a deployment run."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # set by Prefect's workers and runners for the flow runs they start
        return True
    if multiprocessing.parent_process() is not None:
        return True
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            distributed.get_worker()
            return True
        except ValueError:
            pass
    return False


@contextmanager
def meter(
    label: str,
    log: Callable[[str], None],
    total: int = 0,
    unit: str = "steps",
    console: Console | None = None,
    display: Display | None = None,
    pacer: LinePacer | None = None,
) -> Iterator[Meter]:
    """A progress meter for one piece of long work: a bar on an interactive terminal, else plain lines through `log`.

    `total` may be left 0 when the work only learns its size later (update(done, total=...)). The bar shows
    100% when the block ends normally; the row disappears either way.
    """
    if display is None:
        console = console if console is not None else run_console()
        display = choose_display(console.is_interactive, elsewhere())
    if display == "lines":
        yield LineMeter(label, total, unit, log, pacer or LinePacer())
        return
    bar = BarMeter(label, total, unit, console if console is not None else run_console())
    try:
        yield bar
        bar.finish()
    finally:
        bar.close()
