"""A busy machine slows a run down but never kills it with a traceback."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from eightgen.rundir import find_run, verify_run
from helpers import TINY, shared_cache

ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    while True:
        pass


@pytest.mark.slow
def test_a_run_on_saturated_cores_finishes_cleanly(mnist_dir: Path, tmp_path: Path, tmp_path_factory) -> None:
    where = ["--mnist-dir", str(mnist_dir), "--cache-dir", str(shared_cache(tmp_path_factory)), "--runs-root", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(4 * (os.cpu_count() or 2))]
    for hog in hogs:
        hog.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "run", *TINY, "--steps", "4", *where],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        load = os.getloadavg()[0]
    finally:
        for hog in hogs:
            hog.kill()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Timed out" not in output, output[-3000:]
    assert load > (os.cpu_count() or 2), f"the cores were not saturated (load {load:.1f})"
    run_dir = find_run(tmp_path / "runs")  # the run it made, complete: every file matches its manifest
    verify_run(run_dir)
    assert (run_dir / "report.html").is_file() and len(pd.read_parquet(run_dir / "results.parquet")) == (2 + 1) * 2
