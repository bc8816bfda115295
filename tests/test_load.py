"""A busy machine slows a run down but never kills it with a traceback."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, shared_cache

from eightgen.rundir import find_run, verify_run

ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    while True:
        pass


def _sample_running(into: list[int], stop: threading.Event) -> None:
    """Append the number of runnable threads (/proc/loadavg's fourth field) every 0.2 s until stopped."""
    while not stop.wait(0.2):
        into.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))


@pytest.mark.slow
def test_a_run_on_saturated_cores_finishes_cleanly(mnist_dir: Path, tmp_path: Path, tmp_path_factory) -> None:
    where = ["--mnist-dir", str(mnist_dir), "--cache-dir", str(shared_cache(tmp_path_factory)), "--runs-root", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cores = os.cpu_count() or 2
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(2 * cores)]
    for hog in hogs:
        hog.start()
    running: list[int] = []  # runnable threads on the machine, sampled while the run goes on
    done_event = threading.Event()
    sampler = threading.Thread(target=_sample_running, args=(running, done_event), daemon=True)
    sampler.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "run", *TINY, "--steps", "4", *where],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
    finally:
        done_event.set()
        for hog in hogs:
            hog.kill()
    sampler.join()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Timed out" not in output, output[-3000:]
    # saturated: more runnable threads than cores for nearly the whole run (the hogs alone are twice the cores)
    saturated = sum(r > cores for r in running) / max(len(running), 1)
    assert len(running) >= 5 and saturated >= 0.9, f"the cores were not saturated: {running}"
    run_dir = find_run(tmp_path / "runs")  # the run it made, complete: every file matches its manifest
    verify_run(run_dir)
    assert (run_dir / "report.html").is_file() and len(pd.read_parquet(run_dir / "results.parquet")) == (2 + 1) * 2
