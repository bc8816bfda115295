"""Faults: a run killed in every stage, a corrupt byte in each store, a full disk; the rerun heals it.

Every rerun must end with the results of a clean run, byte for byte, and recompute only what was lost or damaged
(outputs' hashes leave timings out, so a recomputed output has the hash it had and nothing downstream reruns).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from eightgen.config import ExperimentConfig
from eightgen.rundir import RESULTS
from flows.pipeline import pipeline
from prefect_api.records import task_run_states, wait_for_records
from helpers import TINY, run_bytes, tiny_config
from tasks.faults import HOLD_IN, HOLD_MARKER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Two epochs, so a log line marks the middle of training; 40 steps, so an optimisation chunk lasts long enough to be hit.
SETTINGS = [*TINY, "--max-train", "600", "--epochs", "2", "--steps", "40", "--run-name", "faults"]
UNCACHED = {"fingerprint-source", "publish-summary"}  # tasks that run every time by design


def run_files(cfg: ExperimentConfig) -> dict[str, bytes]:
    """The bytes of a finished run's results and trajectories."""
    return run_bytes(cfg.run_dir)


def run_here(cfg: ExperimentConfig) -> tuple[bool, dict[str, list[str]], str]:
    """Run the pipeline in this process: whether it completed, its task states, and its failure message."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        state = pipeline(cfg, return_state=True)
        wait_for_records(state.state_details.flow_run_id)
    message = "" if state.is_completed() else str(state.result(raise_on_failure=False))
    return state.is_completed(), task_run_states(state.state_details.flow_run_id), message


def recomputed(states: dict[str, list[str]]) -> dict[str, int]:
    """Cached tasks that ran instead of coming back Cached: name -> how many runs."""
    return {name: s.count("Completed") for name, s in states.items() if name not in UNCACHED and "Completed" in s}


@dataclass(frozen=True)
class Clean:
    """A clean, undisturbed run of SETTINGS on a cache of its own: its config and files."""

    cfg: ExperimentConfig
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def clean(prefect_harness, mnist_dir: Path, tmp_path_factory) -> Clean:
    """The clean run everything else is compared with."""
    where = tmp_path_factory.mktemp("clean")
    cfg = tiny_config(mnist_dir, where / "cache", where / "runs", *SETTINGS)
    done, _, message = run_here(cfg)
    assert done, message
    return Clean(cfg, run_files(cfg))


@pytest.fixture(scope="module")
def faulty(mnist_dir: Path, tmp_path_factory) -> ExperimentConfig:
    """The config of the runs that get killed and damaged (a cache and runs root of their own)."""
    where = tmp_path_factory.mktemp("faulty")
    return tiny_config(mnist_dir, where / "cache", where / "runs", *SETTINGS)


def start_cli(cfg: ExperimentConfig, mnist_dir: Path, log: Path, hold_in: str | None = None) -> subprocess.Popen:
    """`eightgen run SETTINGS` in a process group of its own, recording to the session's Prefect API; optionally
    stopping in the middle of one task (EIGHTGEN_HOLD_IN) until it is killed."""
    argv = [*SETTINGS, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cfg.cache_dir), "--runs-root", str(cfg.runs_root)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": PREFECT_API_URL.value()}
    if hold_in:
        env |= {HOLD_IN: hold_in, HOLD_MARKER: str(log.with_suffix(".held"))}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", *argv], cwd=ROOT, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """SIGKILL the process group as soon as `ready()` holds (failing if the run ends or stalls first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the fault:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the fault's moment never came:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def held(locks: Path, pattern: str) -> bool:
    """Whether some process holds one of the stage locks matching pattern."""
    for lock in locks.glob(pattern):
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    return False


def entries(cfg: ExperimentConfig, kind: str) -> list[Path]:
    """The finished entries of one store (staging folders are hidden)."""
    store = cfg.cache_dir / kind
    return sorted(p for p in store.iterdir() if not p.name.startswith(".")) if store.is_dir() else []


def test_runs_killed_in_every_stage_are_finished_by_a_rerun(
    clean: Clean, faulty: ExperimentConfig, mnist_dir: Path, tmp_path: Path
) -> None:
    # killed while assembling the dataset (its files written, its manifest not yet): no dataset is left behind
    log = tmp_path / "assembly.log"
    kill_when(start_cli(faulty, mnist_dir, log, hold_in="assemble-dataset"), log.with_suffix(".held").exists, log)
    assert not entries(faulty, "datasets") and not held(faulty.cache_dir / "locks", "datasets-*.lock")

    # killed in the middle of training: no model is left behind, and its lock dies with it
    log = tmp_path / "training.log"
    kill_when(start_cli(faulty, mnist_dir, log), lambda: "epoch 1/2" in log.read_text(), log)
    assert entries(faulty, "datasets") and not entries(faulty, "models")
    locks = faulty.cache_dir / "locks"
    assert list(locks.glob("models-*.lock")) and not held(locks, "models-*.lock")

    # the next run is not blocked; it trains, and is killed while it optimises a chunk
    log = tmp_path / "attack.log"
    kill_when(start_cli(faulty, mnist_dir, log), lambda: held(locks, "attacks-*.lock"), log)
    assert "epoch 2/2" in log.read_text() and len(entries(faulty, "models")) == 1
    assert not (faulty.run_dir / RESULTS).exists()

    # killed as it collects the results (every chunk done), then as it renders the report: no run directory, then
    # a run directory without a report
    for stage, name in (("collect-results", "collect"), ("render-report", "report")):
        log = tmp_path / f"{name}.log"
        kill_when(start_cli(faulty, mnist_dir, log, hold_in=stage), log.with_suffix(".held").exists, log)
    assert len(entries(faulty, "attacks")) == 3 and (faulty.run_dir / RESULTS).exists()
    assert not (faulty.run_dir / "report.html").exists()

    # the rerun reuses everything that was finished, renders the report, and ends with the clean run's files
    done, states, message = run_here(faulty)
    assert done, message
    assert set(recomputed(states)) == {"render-report"}, states
    assert run_files(faulty) == clean.files
    leftovers = [p for kind in ("datasets", "models", "attacks") for p in (faulty.cache_dir / kind).iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_byte_in_every_store_recomputes_those_outputs_only(clean: Clean, faulty: ExperimentConfig) -> None:
    if not (faulty.run_dir / RESULTS).exists():
        done, _, message = run_here(faulty)  # this test alone: finish the faulty run first
        assert done, message
    counts = {kind: len(entries(faulty, kind)) for kind in ("datasets", "models", "attacks")}
    assert counts == {"datasets": 1, "models": 1, "attacks": 3}, counts
    for damaged in (
        entries(faulty, "datasets")[0] / "dataset.npz",
        entries(faulty, "models")[0] / "model.pt",
        entries(faulty, "attacks")[1] / "trajectory.npz",
        faulty.run_dir / RESULTS,
    ):
        flip_a_byte(damaged)
    done, states, message = run_here(faulty)
    assert done, message
    # each damaged output once, and what depends on the run directory; the model and dataset come back with the
    # hashes they had, so the two intact chunks and nothing else downstream of them is recomputed
    expected = {"assemble-dataset": 1, "train-classifier": 1, "optimize-chunk": 1, "collect-results": 1, "render-report": 1}
    assert recomputed(states) == expected, states
    assert run_files(faulty) == clean.files
    assert {kind: len(entries(faulty, kind)) for kind in counts} == counts  # rebuilt in place: no new entry anywhere


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (mounting one needs root, as in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=False, capture_output=True, text=True)
    assert mounted.returncode == 0, f"the full-disk test mounts a tmpfs and needs root for it: {mounted.stderr.strip()}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_fails_the_run_cleanly_and_the_rerun_after_freeing_space_finishes_it(
    clean: Clean, mnist_dir: Path, small_disk: Path
) -> None:
    # the clean run's cache: every stage before the run directory comes back Cached
    cfg = tiny_config(mnist_dir, clean.cfg.cache_dir, small_disk / "runs", *SETTINGS)
    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))  # 8 KiB left: the run directory cannot fit

    done, _, message = run_here(cfg)
    assert not done and "No space left on device" in message, message
    assert [p.name for p in small_disk.iterdir() if p.name != "runs"] == ["filler"]
    assert not [p for p in cfg.runs_root.iterdir() if p.is_dir()], "a partial run directory was left behind"

    filler.unlink()
    done, states, message = run_here(cfg)
    assert done, message
    assert recomputed(states) == {"collect-results": 1, "render-report": 1}, states
    assert run_files(cfg) == clean.files
