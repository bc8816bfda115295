"""Attack chunks fanned out over a real Dask cluster give the thread runner's results."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from cli.main import main
from runtime.dask_runner import dask_runner
from flows.pipeline import pipeline
from prefect_api.records import flow_tree, task_run_states, wait_for_records
from flows.stages import attack_flow_on
from helpers import chunk_count, shared_cache, tiny_config

pytestmark = pytest.mark.slow  # trains models, starts servers or clusters: the full suite only

FLOATS = ["p_target_start", "p_target_final", "l2_final", "linf_final", "grad_norm_final", "frac_outside_01"]
EXACT = ["run_id", "start_kind", "start_digit", "source_index", "seed", "success", "flip_step", "stays_flipped", "censored"]


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster: 2 worker processes with 1 thread each, on 127.0.0.1."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def cfg(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """A tiny pipeline with 4 attack chunks, its attack settings used by no other test."""
    options = ["--digits", "1,3,5", "--steps", "8", "--record-every", "4"]
    return tiny_config(mnist_dir, shared_cache(tmp_path_factory), tmp_path_factory.mktemp("dask"), *options)


def _chunk_states(flow_run_id) -> list[str]:
    """States of the optimize-chunk task runs of a pipeline run, read from the API."""
    wait_for_records(flow_run_id)
    return task_run_states(flow_run_id)["optimize-chunk"]


def test_dask_chunks_match_thread_chunks(prefect_harness, cluster, cfg: ExperimentConfig) -> None:
    on_dask = cfg.model_copy(update={"run_name": "on-dask"})
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        threads = pipeline(cfg, return_state=True)
        assert threads.is_completed(), threads
        # force: the chunks are cached by now; recompute them on the cluster's workers
        dask = pipeline(on_dask, force=True, task_runner="dask", dask_address=cluster.scheduler_address, return_state=True)
        assert dask.is_completed(), dask
    chunks = chunk_count(cfg)
    assert _chunk_states(dask.state_details.flow_run_id) == ["Completed"] * chunks
    # each chunk reported its progress from its worker, ending at 100 %
    with get_client(sync_client=True) as client:
        tree = flow_tree(client, dask.state_details.flow_run_id)
        progress = [a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=tree))) if a.type == "progress"]
    assert len(progress) == chunks and all(float(a.data) == 100.0 for a in progress), progress
    a = pd.read_parquet(cfg.run_dir / "results.parquet")
    b = pd.read_parquet(on_dask.run_dir / "results.parquet")
    assert len(a) == len(b) == 4 * 2
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT])
    for col in FLOATS:
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=1e-4, atol=1e-5, err_msg=col)
    # the chunks ran on the workers, whose torch uses exactly their one thread
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        durations = client.run_on_scheduler(
            lambda dask_scheduler: {p: dict(tp.all_durations) for p, tp in dask_scheduler.task_prefixes.items()}
        )
        in_tasks = client.gather([client.submit(_torch_threads, i, pure=False) for i in range(4)])
    assert durations["optimize_chunk"]["compute"] > 0, durations
    assert in_tasks == [1, 1, 1, 1]


def _torch_threads(_: int) -> int:
    """torch's intra-op thread count where this runs."""
    import torch

    return torch.get_num_threads()


def test_local_cluster_runner_gives_torch_the_worker_threads(prefect_harness) -> None:
    # Dask starts workers with OMP_NUM_THREADS=1; the runner's plugin must raise torch to the worker's 2 threads
    @task
    def where() -> tuple[int, int]:
        import torch

        return os.getpid(), torch.get_num_threads()

    @flow(task_runner=dask_runner(workers=1, threads=2))
    def probe() -> list[tuple[int, int]]:
        return [f.result() for f in [where.submit() for _ in range(3)]]

    answers = probe()
    assert {threads for _, threads in answers} == {2}
    assert len({pid for pid, _ in answers}) == 1 and os.getpid() not in {pid for pid, _ in answers}


def test_unreachable_dask_address_fails_before_any_flow(capsys: pytest.CaptureFixture[str], mnist_dir: Path, tmp_path: Path) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    argv = ["run", "--mnist-dir", str(mnist_dir), "--dask-address", address, "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eightgen: error: no Dask scheduler reachable at '{address}'"), err
    assert not (tmp_path / "cache").exists()
    with pytest.raises(EightgenError, match="absolute path"):
        attack_flow_on("dask", address, Path("relative/cache"))


def _hold_chunk_one(marker: Path) -> dict[str, str]:
    from tasks.faults import HOLD_CHUNK, HOLD_IN, HOLD_MARKER

    return {HOLD_IN: "optimize-chunk", HOLD_CHUNK: "1", HOLD_MARKER: str(marker)}


def test_a_worker_killed_mid_chunk_has_its_chunk_recomputed_elsewhere(prefect_harness, cfg: ExperimentConfig, tmp_path: Path, monkeypatch) -> None:
    """kill -9 of the worker running a chunk: Dask runs the chunk again on a worker that is left, and the run ends with
    the thread runner's results (nothing the dead worker half-wrote is reused)."""
    import signal
    import threading
    import time

    from distributed import LocalCluster

    marker = tmp_path / "held"
    for name, value in _hold_chunk_one(marker).items():
        monkeypatch.setenv(name, value)  # the workers started below inherit it; the chunk holds once, on the first try
    lost = cfg.model_copy(update={"run_name": "worker-lost"})
    killed = {}

    def kill_the_holder() -> None:
        deadline = time.monotonic() + 300
        while not marker.exists() or not marker.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        killed["pid"] = int(marker.read_text())
        os.kill(killed["pid"], signal.SIGKILL)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        threading.Thread(target=kill_the_holder, daemon=True).start()
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
            state = pipeline(lost, force=True, task_runner="dask", dask_address=cluster.scheduler_address, return_state=True)
    assert killed and state.is_completed(), state
    if not (cfg.run_dir / "results.parquet").exists():  # the thread runner's run of the same settings, for comparison
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
            assert pipeline(cfg, return_state=True).is_completed()
    a = pd.read_parquet(cfg.run_dir / "results.parquet")
    b = pd.read_parquet(lost.run_dir / "results.parquet")
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT])
    for col in FLOATS:
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=1e-4, atol=1e-5, err_msg=col)
    assert not [p for p in (cfg.cache_dir / "attacks").iterdir() if p.name.startswith(".")]  # no staging left behind
