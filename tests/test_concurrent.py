"""Identical and overlapping `eightgen run`s at once on one cold cache: all finish, and each output is computed once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import eightgen.artifacts
from eightgen.artifacts import fresh_sibling, swap_in
from eightgen.rundir import verify_run
from helpers import TINY, embedded_task_states, run_bytes

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = 3  # TINY: 2 start digits + noise, 2 seeds each, 2 starts per chunk


def cli_env(home: Path) -> dict[str, str]:
    """The environment of `eightgen run` subprocesses sharing one Prefect home (its API server stops with the last)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(home), "EIGHTGEN_SERVER_IDLE_SECONDS": "0"}


@pytest.mark.slow
@pytest.mark.parametrize("locks", ["files", "redis"])
def test_three_runs_at_once_on_one_cold_cache_compute_each_output_once(locks: str, mnist_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cache, home = tmp_path / "cache", tmp_path / "home"
    lock_url = ["--lock-url", request.getfixturevalue("redis_url")] if locks == "redis" else []
    locks_taken = _lock_commands(lock_url)
    # two identical runs (same runs root and run name: one run directory) and a third writing its run elsewhere
    roots = [tmp_path / "runs", tmp_path / "runs", tmp_path / "other-runs"]
    logs = [tmp_path / f"run-{i}.log" for i in range(len(roots))]
    procs = []
    for root, log in zip(roots, logs):
        argv = [*TINY, "--max-train", "600", "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache), "--runs-root", str(root), "--run-name", "same", *lock_url]
        with log.open("w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", *argv], cwd=ROOT, env=cli_env(home), stdout=out, stderr=subprocess.STDOUT
            ))
    codes = [proc.wait(timeout=300) for proc in procs]
    outputs = [log.read_text() for log in logs]
    for code, text in zip(codes, outputs):
        assert code == 0, text[-3000:]

    # one process computed each content-addressed output; the others waited for its lock and found its record
    states = embedded_task_states(home)  # the task runs of all three
    runs = len(roots)
    for name in ("assemble-dataset", "train-classifier"):
        assert sorted(states[name]) == ["Cached"] * (runs - 1) + ["Completed"], states
    chunks = states["optimize-chunk"]
    assert len(chunks) == runs * CHUNKS and chunks.count("Completed") == CHUNKS, states
    assert sum("epoch 1/1" in text for text in outputs) == 1, "the detector was trained more than once"
    assert len(list((cache / "models").iterdir())) == 1  # one model, no staging folder left behind

    # both run directories are whole, and hold byte-identical results
    same, other = roots[0] / "same", roots[2] / "same"
    verify_run(same)
    verify_run(other)
    assert run_bytes(same) == run_bytes(other)
    # the run's lock file (none with Redis locks), the runs index (page and history), no staging folder
    lock_file = [".same.lock"] if locks == "files" else []
    assert sorted(p.name for p in roots[0].iterdir()) == [*lock_file, "index-history.jsonl", "index.html", "same"]
    assert (cache / "locks").is_dir() == (locks == "files")
    if locks == "redis":  # every output's lock went through Redis: 3 runs x (dataset, model, chunks, run directory)
        assert _lock_commands(lock_url) - locks_taken >= runs * (2 + CHUNKS + 1)


def _lock_commands(lock_url: list[str]) -> int:
    """How many locks the Redis server has been asked for so far (SET NX calls), 0 without one."""
    if not lock_url:
        return 0
    from redis import Redis

    return int(Redis.from_url(lock_url[1]).info("commandstats").get("cmdstat_set", {}).get("calls", 0))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "renames"])
def test_racing_swaps_into_one_directory_never_fail_and_leave_one_whole_directory(exchange, monkeypatch, tmp_path: Path) -> None:
    if not exchange:
        monkeypatch.setattr(eightgen.artifacts, "_exchange", lambda a, b: False)  # as on a system without renameat2
    final, errors = tmp_path / "out", []

    def writer(i: int) -> None:
        try:
            for round_ in range(25):
                new = fresh_sibling(final, "new")
                for name in "abc":
                    (new / name).write_text(f"{i}.{round_}")
                swap_in(new, final)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({(final / name).read_text() for name in "abc"}) == 1  # one writer's directory, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing moved aside is left behind
