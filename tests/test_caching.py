"""Where a cached stage judges its Prefect record and which output it locks: from the running task, not the settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from tasks.caching import CachedStage, OutputLocks, _record_file


def test_a_record_is_judged_in_the_result_store_the_task_reads(tmp_path: Path) -> None:
    store = SimpleNamespace(result_storage=SimpleNamespace(basepath=str(tmp_path / "flow-store")))
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "settings-store"}):
        # a worker thread can see other settings than the store its flow run resolved: the store wins
        assert _record_file(SimpleNamespace(result_store=store), "k") == tmp_path / "flow-store" / "k"
        assert _record_file(SimpleNamespace(result_store=None), "k") == tmp_path / "settings-store" / "k"


def test_one_key_in_two_caches_locks_each_cache_s_own_output(tmp_path: Path, monkeypatch) -> None:
    stage = CachedStage("models")
    locks = OutputLocks(stage)
    for cache in ("a", "b"):
        ctx = SimpleNamespace(parameters={"cache_dir": tmp_path / cache})
        monkeypatch.setattr("tasks.caching.TaskRunContext.get", lambda ctx=ctx: ctx)
        assert locks.acquire_lock("train-classifier-0123456789abcdef", holder=cache)
        lock, out = locks._locate("train-classifier-0123456789abcdef")
        assert out == tmp_path / cache / "models" / "0123456789abcdef" and lock.is_relative_to(tmp_path / cache)
        locks.release_lock("train-classifier-0123456789abcdef", holder=cache)
