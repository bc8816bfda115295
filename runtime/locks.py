"""Where the stage locks live: flocks on lock files in the cache (one machine, or a shared disk), or Redis (many hosts).

A lock is named by its lock file (<cache_dir>/locks/<kind>-<entry>.lock, or .<run>.lock beside a run directory). With
a Redis URL (--lock-url, or $EIGHTGEN_LOCK_URL) the same names become Redis locks through Prefect's Redis lock manager
(prefect-redis), and no lock file is made. A flock goes when its process dies; a Redis lock is held for HOLD seconds
($EIGHTGEN_LOCK_HOLD) and renewed while its holder lives, so a killed holder blocks the others for at most that long.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from eightgen.errors import EightgenError

LOCK_URL_ENV = "EIGHTGEN_LOCK_URL"
POLL = 0.1  # seconds between tries for a lock wanted within a time limit
HOLD = 15.0  # seconds a Redis lock outlives its last renewal (a killed holder's lock frees itself after this)
HOLD_ENV = "EIGHTGEN_LOCK_HOLD"  # another number of seconds for HOLD, read by every process that takes a lock
PREFIX = "eightgen"  # the Redis key prefix of every lock


def lock_url() -> str | None:
    """The Redis URL stage locks go through, or None for file locks."""
    return os.environ.get(LOCK_URL_ENV) or None


def hold_seconds() -> float:
    """How long a Redis lock outlives its last renewal: $EIGHTGEN_LOCK_HOLD, else HOLD."""
    text = os.environ.get(HOLD_ENV)
    if not text:
        return HOLD
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86400:
        raise EightgenError(f"{HOLD_ENV}={text}: not a number of seconds between 0 and a day")
    return seconds


def use_lock_url(url: str | None) -> None:
    """Send this command's stage locks (and its Dask workers') through the Redis at url, after checking it answers."""
    if url is None:
        return
    hold_seconds()  # a bad hold time is named before any work
    if not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")):
        raise EightgenError(f"--lock-url {url}: not a Redis URL (redis://host:port/db)")
    _check(url)
    os.environ[LOCK_URL_ENV] = url


def _check(url: str) -> None:
    """EightgenError in one line unless the Redis at url answers within a few seconds."""
    from redis import Redis

    try:
        Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 (any failure to reach it is the same bad setting)
        raise EightgenError(f"--lock-url {url}: Redis does not answer ({type(exc).__name__}: {exc})") from None


class Locks(Protocol):
    """What a stage lock needs from where locks live."""

    def take(self, lock_file: Path, timeout: float | None) -> Any | None:
        """Hold the lock exclusively (waiting at most timeout seconds, None: as long as it takes); a handle, or None."""

    def give_back(self, handle: Any) -> None:
        """Release a held lock."""

    def held(self, lock_file: Path) -> bool:
        """Whether anyone holds the lock now."""

    def wait_free(self, lock_file: Path, timeout: float | None) -> bool:
        """Wait until nobody holds the lock (at most timeout seconds); whether it is free."""

    def reading(self, lock_file: Path) -> Any:
        """A context in which no writer holds the lock: for judging an output and its record."""


class FileLocks:
    """flock on lock files: the system drops a lock when its process dies."""

    def take(self, lock_file: Path, timeout: float | None) -> int | None:
        fd = _open(lock_file)
        if _flock(fd, fcntl.LOCK_EX, timeout):
            return fd
        os.close(fd)
        return None

    def give_back(self, handle: int) -> None:
        os.close(handle)  # closing the file drops its lock

    def held(self, lock_file: Path) -> bool:
        if not lock_file.exists():
            return False
        return not self.wait_free(lock_file, 0)

    def wait_free(self, lock_file: Path, timeout: float | None) -> bool:
        fd = _open(lock_file)
        try:
            return _flock(fd, fcntl.LOCK_SH, timeout)
        finally:
            os.close(fd)

    @contextmanager
    def reading(self, lock_file: Path) -> Iterator[None]:
        fd = _open(lock_file)
        try:
            _flock(fd, fcntl.LOCK_SH, None)
            yield
        finally:
            os.close(fd)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _flock(fd: int, how: int, timeout: float | None) -> bool:
    """flock an open lock file (LOCK_EX or LOCK_SH): wait for it, or for at most `timeout` seconds; whether it was taken."""
    if timeout is None:
        fcntl.flock(fd, how)
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)


class RedisLocks:
    """Locks in Redis through prefect-redis's RedisLockManager, each renewed by a thread while it is held."""

    def __init__(self, url: str) -> None:
        from prefect_redis.locking import RedisLockManager

        _check(url)
        self.url = url
        self.manager = RedisLockManager(connection_url=url)

    @staticmethod
    def key(lock_file: Path) -> str:
        """The lock's name in Redis: the folder it guards and its lock file's name, never where the cache lives."""
        return f"{PREFIX}:{lock_file.parent.name}/{lock_file.name}"

    def take(self, lock_file: Path, timeout: float | None) -> tuple[str, str, threading.Event] | None:
        key, holder = self.key(lock_file), uuid.uuid4().hex
        if not self.manager.acquire_lock(key, holder, acquire_timeout=timeout, hold_timeout=hold_seconds()):
            return None
        stop = threading.Event()
        threading.Thread(target=self._renew, args=(key, holder, stop), name="eightgen-lock-renewal", daemon=True).start()
        return key, holder, stop

    def _renew(self, key: str, holder: str, stop: threading.Event) -> None:
        from redis.lock import Lock

        hold = hold_seconds()
        lock = Lock(self.manager.client, self.manager._lock_name_for_key(key), timeout=hold, thread_local=False)
        lock.local.token = holder.encode()
        while not stop.wait(hold / 3):
            try:
                lock.reacquire()
            except Exception:  # noqa: BLE001 (lost or released: nothing left to renew)
                return

    def give_back(self, handle: tuple[str, str, threading.Event]) -> None:
        from redis.exceptions import LockError

        key, holder, stop = handle
        stop.set()
        try:
            self.manager.release_lock(key, holder)
        except (ValueError, LockError):
            pass  # it expired and another holder has it: ours is gone either way

    def held(self, lock_file: Path) -> bool:
        return self.manager.is_locked(self.key(lock_file))

    def wait_free(self, lock_file: Path, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.held(lock_file):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    @contextmanager
    def reading(self, lock_file: Path) -> Iterator[None]:
        self.wait_free(lock_file, None)
        yield


@functools.cache
def _redis(url: str) -> RedisLocks:
    return RedisLocks(url)


def locks_at(url: str | None) -> Locks:
    """The locks of a Redis URL (one connection per URL and process), or file locks for None."""
    return _redis(url) if url else FileLocks()
