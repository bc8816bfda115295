"""Cache keys for stage tasks: settings + upstream content hashes + the code the task imports, tied to the output on disk.

A stage is reused only when its key matches *and* the output on disk is the very output that key produced:
the persisted record holds the output's Artifact (path + sha256 of its manifest), and the manifest carries
the key. Anything else (deleted, edited, replaced, overwritten by another run, corrupt) drops the record,
so the task runs again. Keys never contain where the cache lives, so a cache can be moved or shared.

Several processes (or threads, or hosts) may ask for the same output at once. Each stage task runs under
Prefect's SERIALIZABLE isolation with an `OutputLocks` lock manager: an exclusive lock per output directory (a
flock, or a Redis lock with --lock-url: runtime/locks.py), held from the look-up of the task's record until the record
is written. One caller computes the output; the others wait, then find its record and come back `Cached`. A killed
holder's lock goes with it (a flock at once, a Redis lock when its renewals stop), so it never blocks the next run.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH
from prefect.transactions import IsolationLevel
from pydantic import BaseModel

from eightgen.artifacts import MANIFEST, Artifact, clear_leftovers, read_manifest, sha256_file
from eightgen.codekey import code_digest
from eightgen.errors import EightgenError
from eightgen.store import local, location, same
from runtime.locks import lock_url, locks_at

# Parameters that never change what a stage computes: how hard to try, and where the cache lives.
NOT_IN_KEY = ("force", "overwrite", "cache_dir")
STAGE_KEY = "stage_key"  # manifest field naming the key that produced an output
LOCKS = "locks"  # <cache_dir>/locks/: one lock file per content-addressed output


def _canonical(value: Any) -> Any:
    """A JSON-able form of a task parameter; artifacts count by content hash, never by path."""
    if isinstance(value, Artifact):
        return {"artifact_sha256": value.sha256}
    if isinstance(value, BaseModel):
        return {k: v for k, v in value.model_dump(mode="json").items() if k not in NOT_IN_KEY}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    return value


def stage_key(fn: Callable[..., Any], parameters: dict[str, Any]) -> str:
    """Hex key of a stage call: the code its module imports (computed) and its canonicalised parameters."""
    params = {k: _canonical(v) for k, v in sorted(parameters.items()) if k not in NOT_IN_KEY}
    payload = json.dumps({"code": code_digest(fn.__module__), "parameters": params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def produced_by(directory: Path, key: str, manifest: str = MANIFEST) -> bool:
    """Whether a directory holds an intact output (every file matches its manifest) that this key produced."""
    try:
        return read_manifest(directory, name=manifest).get(STAGE_KEY) == key
    except EightgenError:
        return False


def _recorded(record_file: Path) -> Artifact | None:
    """The Artifact a persisted Prefect result record holds, or None if it is unreadable or something else."""
    from prefect._internal.result_records import ResultRecord

    try:
        value = ResultRecord.deserialize(record_file.read_bytes()).result
    except Exception:  # a corrupt or foreign record is simply not reusable
        return None
    return value if isinstance(value, Artifact) else None


def _record_file(context: TaskRunContext, key: str) -> Path:
    """Where Prefect will look for this key's record: in the running task's own result store (a folder, or a store URL).

    The settings can name another folder than the store a flow run resolved when it started (a process whose
    environment changed since): judging the record in the wrong folder would let a stale one through.
    """
    storage = getattr(getattr(context, "result_store", None), "result_storage", None)
    base = getattr(storage, "basepath", None)
    where = location(base) if base else Path(PREFECT_LOCAL_STORAGE_PATH.value())
    return (where.expanduser() if isinstance(where, Path) else where) / key


@dataclass(frozen=True)
class CachedStage:
    """How one stage task is cached: where its output lives and which manifest describes it.

    kind: the content-addressed store folder (<cache_dir>/<kind>/<key prefix>), or None when the output
    is the run directory named by the task's `run_dir` parameter.
    """

    kind: str | None
    manifest: str = MANIFEST

    def output_dir(self, parameters: dict[str, Any], key: str) -> Path:
        """Where the output of this call belongs."""
        if self.kind is None:
            return location(parameters["run_dir"])
        return location(parameters["cache_dir"]) / self.kind / key.rsplit("-", 1)[-1][:20]

    def lock_file(self, out: Path) -> Path:
        """The lock file of an output directory: <cache_dir>/locks/<kind>-<entry>.lock, or .<name>.lock beside a run
        (an output in a store: beside this host's copy of it; a Redis lock takes only the name)."""
        out = local(out)
        if self.kind is None:
            return out.parent / f".{out.name}.lock"
        return out.parent.parent / LOCKS / f"{self.kind}-{out.name}.lock"

    def key_of(self, name: str, fn: Callable[..., Any], parameters: dict[str, Any]) -> str:
        """The cache key of a call: task name + stage key."""
        return f"{name}-{stage_key(fn, parameters)}"

    def reusable(self, record: Artifact | None, out: Path, key: str) -> bool:
        """Whether a persisted record may be reused: it names `out`, whose manifest is intact, from this key,
        and hashes to what the record says."""
        if record is None or not same(record.path, out) or not produced_by(out, key, self.manifest):
            return False
        return sha256_file(local(out) / self.manifest) == record.sha256

    def key_fn(self, context: TaskRunContext, parameters: dict[str, Any]) -> str:
        """Prefect cache_key_fn: the key; drops a record whose output on disk is not the one it produced.

        The check waits while another caller holds the output's lock: it never judges a half-written output or record.
        """
        key = self.key_of(context.task.name, context.task.fn, parameters)
        record_file = _record_file(context, key)
        if record_file.exists():
            out = self.output_dir(parameters, key)
            with locks_at(lock_url()).reading(self.lock_file(out)):
                if parameters.get("force") or not self.reusable(_recorded(record_file), out, key):
                    record_file.unlink(missing_ok=True)
        return key

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for @task: the cache key, a persisted record, and one computing caller per output."""
        policy = CachePolicy.from_cache_key_fn(self.key_fn).configure(
            isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=OutputLocks(self)
        )
        return {"cache_policy": policy, "persist_result": True}

    def here(self) -> tuple[Path, str]:
        """Inside the running task: the directory its output belongs in, and the key it must carry."""
        ctx = TaskRunContext.get()
        parameters = dict(ctx.parameters)
        key = self.key_of(ctx.task.name, ctx.task.fn, parameters)
        return self.output_dir(parameters, key), key


class OutputLocks:
    """Prefect lock manager of one stage: an exclusive lock (runtime/locks.py) on the output a task run writes.

    Prefect takes it (SERIALIZABLE isolation) before it looks for the task's record, and gives it back once the
    record is written or the run has failed. The lock is found from the running task's parameters. Whoever
    holds it may clear the staging folders a killed writer left beside the output: nobody else can be writing them.
    Where locks live (files, or the Redis of $EIGHTGEN_LOCK_URL) is read when a lock is first used, and travels
    with the manager to Dask workers.
    """

    def __init__(self, stage: CachedStage, url: str | None = None) -> None:
        self.stage, self._url = stage, url
        self._held: dict[tuple[str, str], Any] = {}  # (key, holder) -> the held lock's handle
        self._where: dict[str, tuple[Path, Path]] = {}  # key -> (lock file, output directory)
        self._mutex = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # copied or sent to a Dask worker without open files or held locks
        return {"stage": self.stage, "url": self._url or lock_url()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["stage"], state.get("url"))

    @property
    def locks(self) -> Any:
        """Where this manager's locks live."""
        return locks_at(self._url or lock_url())

    def _locate(self, key: str) -> tuple[Path, Path] | None:
        ctx = TaskRunContext.get()
        if ctx is None:  # outside the task (another thread): where this key was last locked
            with self._mutex:
                return self._where.get(key)
        # keys leave the cache's location out: the same key may name outputs in two caches of one process
        out = self.stage.output_dir(dict(ctx.parameters), key)
        with self._mutex:
            self._where[key] = (self.stage.lock_file(out), out)
            return self._where[key]

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Lock the running task's output (waiting as long as it takes, or at most acquire_timeout seconds)."""
        with self._mutex:
            if (key, holder) in self._held:
                return True
        where = self._locate(key)
        if where is None:
            raise RuntimeError(f"{key}: locked outside a running task, so its output is unknown")
        lock, out = where
        handle = self.locks.take(lock, acquire_timeout)
        if handle is None:
            return False
        with self._mutex:
            self._held[(key, holder)] = handle
        clear_leftovers(out)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """acquire_lock, for async tasks."""
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Give the lock back; nothing happens when this holder does not hold it."""
        with self._mutex:
            handle = self._held.pop((key, holder), None)
        if handle is not None:
            self.locks.give_back(handle)

    def is_locked(self, key: str) -> bool:
        """Whether anyone holds the output's lock now."""
        with self._mutex:
            if any(k == key for k, _ in self._held):
                return True
            where = self._where.get(key)
        return where is not None and self.locks.held(where[0])

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether this holder holds the lock."""
        with self._mutex:
            return (key, holder) in self._held

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock (at most `timeout` seconds); whether it is free."""
        with self._mutex:
            where = self._where.get(key)
        return where is None or self.locks.wait_free(where[0], timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """wait_for_lock, for async callers."""
        return self.wait_for_lock(key, timeout)
