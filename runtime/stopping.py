"""A command stopped halfway ends in seconds with one line: on Ctrl-C or SIGTERM, or when its Prefect API server is lost.

The chunk in progress is abandoned, not finished: its worker thread cannot be interrupted inside torch, so the
process ends with os._exit once its flow runs are marked, its staging folders cleared and its lease given back.
os._exit also keeps C++ runtime threads from aborting the exit ("terminate called without an active exception").
"""

from __future__ import annotations

import contextvars
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from types import FrameType

from eightgen.artifacts import abandon_staging

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LOST_EXIT = 2
MARK_SECONDS = 1.0  # how long telling the API may take before the command exits regardless
POLL_SECONDS = 0.25  # how often the watchdog looks at the server
UNANSWERED_SECONDS = 6.0  # a server whose process lives but does not answer this long counts as lost
KEPT = "finished work is kept: run the same command to continue"
UP, SILENT, GONE = "up", "silent", "gone"  # an API server's health

_lock = threading.Lock()
_chunks = {"planned": 0, "done": 0}
_active: list[Stopper] = []  # the stopper in charge of this process, if any


def track_chunks(futures: Iterable) -> None:
    """Count a flow's chunk futures (Prefect futures on threads or Dask), for the line a stopped command prints."""
    futures = list(futures)
    with _lock:
        _chunks["planned"] += len(futures)
    for f in futures:
        # The wrapped future: asking the Prefect future for its state could call the API from a thread without settings.
        f.wrapped_future.add_done_callback(_chunk_done)


def _chunk_done(wrapped: object) -> None:
    try:
        if hasattr(wrapped, "status"):  # a Dask future
            ok = wrapped.status == "finished"
        else:  # a concurrent.futures.Future holding the task run's final State
            ok = wrapped.exception() is None and wrapped.result().is_completed()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  a future that cannot say counts as not finished
        ok = False
    if ok:
        with _lock:
            _chunks["done"] += 1


def chunk_progress() -> tuple[int, int]:
    """(finished, planned) chunks of the flows this process ran."""
    with _lock:
        return _chunks["done"], _chunks["planned"]


def interrupted_line(signum: int) -> str:
    """The one line a command stopped by a signal prints."""
    done, planned = chunk_progress()
    how = "interrupted" if signum == signal.SIGINT else "terminated"
    after = f" after {done} of {planned} chunks" if planned else ""
    return f"eightgen: {how}{after}; {KEPT}"


class Stopper:
    """While active: SIGINT/SIGTERM and a lost API server end the process within seconds, with one line.

    `mark(reason)` tells the API the command's flow runs stopped (given MARK_SECONDS); `release()` gives back the
    lease on the local server; `health()` says whether the API server is UP, SILENT or GONE (None: not watched),
    and `lost_line` is what the command prints when it is lost.

    Signals reach a listening thread through Python's wakeup fd, not through a handler in the main thread: a flow
    run replaces the SIGTERM handler with one that unwinds the flow, and that unwinding waits for the chunk in
    progress. The handlers installed here only make sure the signals are caught (and Ctrl-C raises nothing).
    """

    def __init__(
        self,
        mark: Callable[[str], None],
        release: Callable[[], None],
        health: Callable[[], str] | None = None,
        lost_line: str = "",
    ) -> None:
        self.mark, self.release, self.health, self.lost_line = mark, release, health, lost_line
        self._previous: dict[int, object] = {}
        self._old_wakeup: int | None = None
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._stopping = threading.Lock()
        self._done = threading.Event()

    def __enter__(self) -> Stopper:
        _active.append(self)
        with _lock:  # the chunks of this command only, when one process runs several (tests, a notebook)
            _chunks.update(planned=0, done=0)
        # Copies of the context carry the command's Prefect settings (which API) into the threads that may tell it.
        if threading.current_thread() is threading.main_thread():
            self._pair = socket.socketpair()
            self._pair[1].setblocking(False)
            self._old_wakeup = signal.set_wakeup_fd(self._pair[1].fileno(), warn_on_full_buffer=False)
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, _caught)
            threading.Thread(target=contextvars.copy_context().run, args=(self._listen, self._pair[0]), name="eightgen-signals", daemon=True).start()
        if self.health is not None:
            threading.Thread(target=contextvars.copy_context().run, args=(self._watch,), name="eightgen-api-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self in _active:
            _active.remove(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._pair is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            for end in self._pair:
                end.close()  # the listener's recv returns: it ends
            self._pair = None

    def _listen(self, reader: socket.socket) -> None:
        while True:
            try:
                got = reader.recv(64)
            except OSError:
                return
            if not got:
                return
            for signum in got:
                if signum in EXIT_CODES:
                    self._end(interrupted_line(signum), EXIT_CODES[signum], True)

    def _watch(self) -> None:
        silent_since = None
        while not self._done.wait(POLL_SECONDS):
            health = self.health()
            if health == UP:
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if health == GONE or time.monotonic() - silent_since >= UNANSWERED_SECONDS:
                self._end(self.lost_line, LOST_EXIT, False)
                return

    def _end(self, line: str, code: int, tell_api: bool) -> None:
        """Silence the console, mark the flow runs (bounded), clear staging folders, give back the lease, print the
        line, exit. A second call (a second signal) exits at once."""
        if not self._stopping.acquire(blocking=False):
            os._exit(code)
        out = _silence_console()
        if tell_api:
            teller = threading.Thread(target=contextvars.copy_context().run, args=(self._mark_quietly, line), daemon=True)
            teller.start()
            teller.join(MARK_SECONDS)
        abandon_staging()
        try:
            self.release()
        except Exception:  # noqa: BLE001  the lease counts as gone once this process is
            pass
        os.write(out, (line + "\n").encode())
        os._exit(code)

    def _mark_quietly(self, reason: str) -> None:
        try:
            self.mark(reason)
        except Exception:  # noqa: BLE001  an API that cannot be told is no reason to keep running
            pass


def _caught(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler, so that the signal is caught and its number written to the wakeup fd."""


def _silence_console() -> int:
    """Point stdout and stderr at /dev/null (what the unwinding flow would still log); a copy of stderr to write to."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    return saved


def stopper_for_cancellation() -> AbstractContextManager:
    """For a flow run started by a runner (a deployment): its SIGTERM (the runner cancelling the run) ends the process at
    once, the staging folders cleared, instead of waiting for the chunk in progress; the runner marks the run Cancelled.
    Nothing when a command's stopper is already in charge, or off the main thread."""
    if _active or threading.current_thread() is not threading.main_thread():
        return nullcontext()
    return Stopper(mark=lambda reason: None, release=lambda: None)
