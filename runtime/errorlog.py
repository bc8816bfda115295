"""A command's error log: full tracebacks go to a file, the terminal gets one line that names it.

The file is `<cache_dir>/logs/eightgen-<YYYYmmdd-HHMMSS>-<pid>.log`, or the same name under
`<tmp>/eightgen-logs/` when the cache dir cannot take it; it is created only when something is written.
While a command runs, Prefect's flow- and task-run loggers copy each record that carries a traceback
into it, and the console shows that record without the traceback (the Prefect API still gets it whole).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

LOGS = "logs"
TEMP_LOGS = "eightgen-logs"
# Prefect's loggers of flow and task runs (logging.yml): their failure records carry the tracebacks.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
LOGGED = "eightgen_error_log"  # attribute set on a record whose traceback is in the log
MAX_LINE = 500


def log_name(when: datetime, pid: int) -> str:
    """The file name of one command's error log."""
    return f"eightgen-{when:%Y%m%d-%H%M%S}-{pid}.log"


def log_dirs(cache_dir: Path | None) -> list[Path]:
    """The folders an error log may go to, in order: <cache_dir>/logs, then <tmp>/eightgen-logs."""
    first = [Path(cache_dir).absolute() / LOGS] if cache_dir is not None else []
    return [*first, Path(tempfile.gettempdir()) / TEMP_LOGS]


def one_line(text: str) -> str:
    """Text as one line: its lines joined by spaces, cut to MAX_LINE characters."""
    joined = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return joined if len(joined) <= MAX_LINE else joined[: MAX_LINE - 1] + "…"


def describe(exc: BaseException) -> str:
    """An unexpected exception in one line: its type and message."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ErrorLog:
    """One command's log of full tracebacks, created on the first write in the first folder that takes it."""

    def __init__(self, cache_dir: Path | None = None, header: str = "", when: datetime | None = None, pid: int | None = None) -> None:
        self.name = log_name(when or datetime.now(), os.getpid() if pid is None else pid)
        self.dirs = log_dirs(cache_dir)
        self.header = header
        self.path: Path | None = None
        self.lost = False  # something could not be written anywhere
        self._lock = threading.Lock()

    def write(self, text: str) -> Path | None:
        """Append text to the log, creating it (with the header) if need be; its path, or None if no folder takes it."""
        with self._lock:
            places = [self.path] if self.path else []
            places += [d / self.name for d in self.dirs if d / self.name != self.path]
            for path in places:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "a", encoding="utf-8") as f:
                        if path != self.path and self.header:
                            f.write(self.header.rstrip("\n") + "\n")
                        f.write(text.rstrip("\n") + "\n")
                except OSError:
                    continue
                self.path = path
                return path
            self.lost = True
            return None

    def write_traceback(self, exc: BaseException) -> Path | None:
        """Append the exception's full traceback; the log's path, or None if no folder takes it."""
        return self.write("".join(traceback.format_exception(exc)))

    def line(self, problem: str) -> str:
        """The one line the terminal shows: `eightgen: error: <problem>`, naming the log if there is one."""
        if self.path:
            details = f" (details: {self.path})"
        elif self.lost:
            details = f" (details not saved: {' and '.join(str(d) for d in self.dirs)} not writable)"
        else:
            details = ""
        return f"eightgen: error: {one_line(problem)}{details}"

    @contextmanager
    def prefect_tracebacks(self) -> Iterator[None]:
        """While inside: tracebacks that Prefect's run loggers record go to this log, not to the console."""
        to_log = _ToLog(self)
        loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
        for logger in loggers:  # a logger's filters survive Prefect's logging.config.dictConfig
            logger.addFilter(to_log)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(to_log)
            _NO_TRACEBACK.remove()


class _ToLog(logging.Filter):
    """On Prefect's run loggers: write each record that carries a traceback to the error log, and mark it."""

    def __init__(self, log: ErrorLog) -> None:
        super().__init__()
        self.log = log
        self.formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.exc_info or record.exc_text) and self.log.write(self.formatter.format(record)) is not None:
            setattr(record, LOGGED, True)
            _NO_TRACEBACK.install()
        return True


class _NoTraceback(logging.Filter):
    """On Prefect's console handlers: show a record whose traceback is in the error log without it.

    Prefect's run loggers hand a record to their own (API) handler before it propagates to the root
    logger's console handler, so the API still records the traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers: list[logging.Handler] = []
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, LOGGED, False):
            record.exc_info = record.exc_text = record.stack_info = None
        return True

    def install(self) -> None:
        """Add this filter to the console handlers Prefect configured (once it has: a run is logging)."""
        from prefect.logging.handlers import PrefectConsoleHandler

        with self._lock:
            for logger in (logging.getLogger(), logging.getLogger("prefect")):
                for handler in logger.handlers:
                    if isinstance(handler, PrefectConsoleHandler) and self not in handler.filters:
                        handler.addFilter(self)
                        self.handlers.append(handler)

    def remove(self) -> None:
        """Take this filter off every handler it was added to."""
        with self._lock:
            for handler in self.handlers:
                handler.removeFilter(self)
            self.handlers.clear()


_NO_TRACEBACK = _NoTraceback()
