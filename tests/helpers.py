"""Test helpers: the one tiny real pipeline config (one cache per test session) and task states of embedded runs.

Every config here has the same dataset and training settings as `eightgen run TINY`, and one cache
dir, so the 8-detector is trained once per session and comes back Cached everywhere else.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from cli.main import build_config, parser
from eightgen.config import ExperimentConfig

# 2 start digits + noise, 2 seeds each, 2 starts per chunk -> 3 optimisation chunks.
TINY = ["--preset", "quick", "--seeds", "2", "--digits", "1,3", "--steps", "5", "--epochs", "1", "--max-train", "2000", "--chunk-size", "2"]


@dataclasses.dataclass
class Trained:
    """A trained model artifact with the progress lines and stdout of its training (conftest's small_cnn)."""

    cfg: object
    artifact: object
    lines: list[str]
    stdout: str


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache dir for tiny runs (its Prefect result records live in prefect-results/ inside)."""
    path = tmp_path_factory.getbasetemp() / "tiny-cache"
    path.mkdir(exist_ok=True)
    return path


def tiny_config(mnist_dir: Path, cache_dir: Path, runs_root: Path, *options: str) -> ExperimentConfig:
    """The config `eightgen run TINY --mnist-dir ... <options>` builds (options override TINY)."""
    argv = ["run", *TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--runs-root", str(runs_root), *options]
    return build_config(parser().parse_args(argv))


def embedded_task_states(home: Path) -> dict[str, list[str]]:
    """Task name -> states recorded in the database of an embedded Prefect API (PREFECT_HOME; subflow stand-ins left out)."""
    with sqlite3.connect(home / "prefect.db") as db:
        rows = db.execute(
            "SELECT name, state_name FROM task_run WHERE id NOT IN "
            "(SELECT parent_task_run_id FROM flow_run WHERE parent_task_run_id IS NOT NULL)"
        ).fetchall()
    states: dict[str, list[str]] = {}
    for name, state in rows:
        states.setdefault(name.rsplit("-", 1)[0], []).append(state)
    return states


def chunk_count(cfg: ExperimentConfig) -> int:
    """How many optimisation chunks a config with a numeric pool_per_digit fans out to."""
    from eightgen.data.grid import n_starts

    pool = dict.fromkeys(range(10), cfg.dataset.pool_per_digit)
    return -(-n_starts(cfg.attack, pool) // cfg.attack.chunk_size)


def run_bytes(run_dir: Path) -> dict[str, bytes]:
    """The bytes of a run directory's results tables and trajectory shards, by relative path."""
    from eightgen.rundir import RESULTS, RESULTS_CSV, trajectories

    paths = [run_dir / RESULTS, run_dir / RESULTS_CSV, *trajectories(run_dir).paths]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in paths}


def run_pipeline(cfg: ExperimentConfig, cache: Path) -> None:
    """Run the pipeline flow in this process (results stored under the cache) and wait until every record landed."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline
    from prefect_api.records import wait_for_records

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cache / "prefect-results"}):
        state = pipeline(cfg, return_state=True)
        assert state.is_completed(), state
        wait_for_records(state.state_details.flow_run_id)
