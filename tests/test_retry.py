"""A failed pipeline run, retried with `prefect flow-run retry`, reruns only what failed; force recomputes a stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from eightgen.config import ExperimentConfig
from flows.pipeline import pipeline
from prefect_api.records import flow_tree, task_states_of, wait_for_records
from flows.stages import assemble_flow
from tasks.faults import FAIL_ONCE, FAIL_ONCE_MARKER
from helpers import chunk_count, shared_cache, tiny_config

pytestmark = pytest.mark.slow  # trains models, starts servers or clusters: the full suite only

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """A tiny pipeline with three attack chunks, its attack settings used by no other test."""
    return tiny_config(mnist_dir, shared_cache(tmp_path_factory), tmp_path_factory.mktemp("retry"), "--steps", "6")


def _tree(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return flow_tree(client, flow_run_id)


@pytest.fixture(scope="module")
def failed_then_retried(prefect_harness, cfg: ExperimentConfig, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the pipeline with one optimisation chunk failing once, then retry the same flow run from Prefect's CLI."""
    marker = tmp_path_factory.mktemp("fault") / "failed-once"
    storage = cfg.cache_dir / "prefect-results"
    faults = {FAIL_ONCE: "optimize-chunk", FAIL_ONCE_MARKER: str(marker)}
    os.environ.update(faults)
    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
            state = pipeline(cfg, return_state=True)
        root = state.state_details.flow_run_id
        wait_for_records(root)
        first_tree = _tree(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | faults
        env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOCAL_STORAGE_PATH": str(storage)}
        env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        prefect = Path(sys.executable).parent / "prefect"
        retry = subprocess.run(
            [str(prefect), "flow-run", "retry", str(root), "--entrypoint", "flows/pipeline.py:pipeline"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        for key in faults:
            os.environ.pop(key, None)
    wait_for_records(root)
    with get_client(sync_client=True) as client:
        after = client.read_flow_run(root)
    retry_tree = [i for i in _tree(root) if i not in first_tree]
    return {
        "state": state, "marker": marker, "first": task_states_of(first_tree[1:]), "retry": retry,
        "after": after, "retried": task_states_of(retry_tree), "storage": storage,
    }


def test_injected_failure_fails_the_run_once(failed_then_retried: dict, cfg: ExperimentConfig) -> None:
    first = failed_then_retried["first"]
    assert failed_then_retried["state"].is_failed()
    assert failed_then_retried["marker"].is_file()
    # the first chunk to run fails; chunks still queued when the flow fails may never start (no record)
    chunks = chunk_count(cfg)
    assert first["optimize-chunk"].count("Failed") == 1 and set(first["optimize-chunk"]) <= {"Failed", "Completed"}, first
    assert len(first["optimize-chunk"]) <= chunks
    assert first["train-classifier"] in (["Completed"], ["Cached"]) and "render-report" not in first


def test_retry_of_the_same_flow_run_reruns_only_what_failed(failed_then_retried: dict, cfg: ExperimentConfig) -> None:
    retry, after, retried = failed_then_retried["retry"], failed_then_retried["after"], failed_then_retried["retried"]
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert after.state.is_completed() and after.run_count == 2
    chunks, done = chunk_count(cfg), failed_then_retried["first"]["optimize-chunk"].count("Completed")
    # finished work comes back Cached; the failed chunk, any that never started, and what depends on them run again
    assert retried["assemble-dataset"] == ["Cached"] and retried["train-classifier"] == ["Cached"], retried
    assert sorted(retried["optimize-chunk"]) == sorted(["Cached"] * done + ["Completed"] * (chunks - done)), retried
    assert retried["collect-results"] == ["Completed"] and retried["render-report"] == ["Completed"], retried
    assert (cfg.run_dir / "report.html").is_file()


def test_force_recomputes_a_cached_stage(failed_then_retried: dict, cfg: ExperimentConfig) -> None:
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: failed_then_retried["storage"]}):
        runs = [assemble_flow(cfg.dataset, cfg.cache_dir, force=force, return_state=True) for force in (False, True, False)]
    states = []
    for state in runs:
        wait_for_records(state.state_details.flow_run_id)
        states.append(task_states_of([state.state_details.flow_run_id])["assemble-dataset"])
    assert states == [["Cached"], ["Completed"], ["Cached"]]
    artifacts = [state.result() for state in runs]
    assert artifacts[0] == artifacts[1] == artifacts[2]  # same content, same sha256: assembly is deterministic
