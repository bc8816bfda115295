"""Stage locks in lock files and in a real Redis: one holder at a time, renewed while it lives, gone when it dies."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eightgen.errors import EightgenError
from runtime.locks import LOCK_URL_ENV, FileLocks, RedisLocks, locks_at, use_lock_url
from tasks.caching import CachedStage, OutputLocks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "redis"])
def locks(request: pytest.FixtureRequest) -> FileLocks | RedisLocks:
    return FileLocks() if request.param == "file" else locks_at(request.getfixturevalue("redis_url"))


def test_one_holder_at_a_time_and_waiters_see_it(locks: FileLocks | RedisLocks, tmp_path: Path) -> None:
    lock = tmp_path / "locks" / f"model-{os.getpid()}-{time.monotonic_ns()}.lock"
    assert not locks.held(lock) and locks.wait_free(lock, 0)
    first = locks.take(lock, None)
    assert first is not None and locks.held(lock)
    started = time.monotonic()
    assert locks.take(lock, 0.3) is None and time.monotonic() - started >= 0.15  # it waited (redis-py polls every 0.1 s)
    assert not locks.wait_free(lock, 0.2)
    locks.give_back(first)
    assert not locks.held(lock) and locks.wait_free(lock, 0)
    second = locks.take(lock, 0)
    assert second is not None
    locks.give_back(second)
    with locks.reading(lock):
        assert not locks.held(lock)


def test_redis_locks_make_no_lock_file(redis_url: str, tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "dataset-abc.lock"
    held = locks_at(redis_url).take(lock, None)
    assert locks_at(redis_url).held(lock) and not lock.parent.exists()
    locks_at(redis_url).give_back(held)


HOLDER = """
import sys, time
from pathlib import Path
import runtime.locks as locks
locks.HOLD = 1.0
locks.RedisLocks(sys.argv[1]).take(Path(sys.argv[2]), None)
print("held", flush=True)
time.sleep(120)
"""


def test_a_redis_lock_is_renewed_while_its_holder_lives_and_frees_itself_when_it_is_killed(redis_url: str, tmp_path: Path) -> None:
    lock = tmp_path / "chunks-killed.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = locks_at(redis_url)
        time.sleep(2.5)  # past two and a half hold times: only the renewals keep it
        assert locks.held(lock)
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        assert locks.wait_free(lock, 5.0)
        assert time.monotonic() - killed <= 1.5  # one hold time after the last renewal, at most
    finally:
        holder.kill()


def test_the_lock_manager_takes_its_redis_url_to_dask_workers(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = OutputLocks(CachedStage("models"))
    assert pickle.loads(pickle.dumps(manager)).locks.__class__ is FileLocks
    monkeypatch.setenv(LOCK_URL_ENV, redis_url)
    copied = pickle.loads(pickle.dumps(manager))
    monkeypatch.delenv(LOCK_URL_ENV)
    assert isinstance(copied.locks, RedisLocks) and copied.locks.url == redis_url


def test_bad_lock_urls_fail_in_one_line_before_any_work(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_URL_ENV, raising=False)
    with pytest.raises(EightgenError, match=r"^--lock-url http://x: not a Redis URL"):
        use_lock_url("http://x")
    with pytest.raises(EightgenError, match=r"^--lock-url redis://127.0.0.1:1/0: Redis does not answer"):
        use_lock_url("redis://127.0.0.1:1/0")
    assert LOCK_URL_ENV not in os.environ
    use_lock_url(redis_url)
    assert os.environ[LOCK_URL_ENV] == redis_url


def test_the_run_command_refuses_a_silent_redis_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cli.main import main

    code = main(["run", "--lock-url", "redis://127.0.0.1:1/0", "--runs-root", str(tmp_path / "runs")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Redis does not answer" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_giving_back_a_lock_that_expired_and_was_taken_again_leaves_the_new_holder_alone(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.locks

    monkeypatch.setattr(runtime.locks, "HOLD", 0.5)
    lock, locks = tmp_path / "runs" / ".expired.lock", RedisLocks(redis_url)
    first = locks.take(lock, None)
    first[2].set()  # its holder stops renewing, as a stalled process would
    time.sleep(0.8)
    second = locks_at(redis_url).take(lock, 1.0)
    assert second is not None
    locks.give_back(first)  # late: not an error, and not the new holder's release
    assert locks_at(redis_url).held(lock)
    locks_at(redis_url).give_back(second)
    assert not locks_at(redis_url).held(lock)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1e9"])
def test_a_bad_hold_time_is_named_in_one_line_before_redis_is_asked(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.locks import HOLD_ENV, hold_seconds, use_lock_url

    monkeypatch.setenv(HOLD_ENV, value)
    with pytest.raises(EightgenError, match=rf"^{HOLD_ENV}={value}: not a number of seconds"):
        use_lock_url("redis://127.0.0.1:1/0")  # no Redis answers there: the hold time is checked first
    monkeypatch.setenv(HOLD_ENV, "2.5")
    assert hold_seconds() == 2.5
