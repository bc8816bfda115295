"""The whole pipeline as real Prefect flow runs on real MNIST: outputs agree, finished stages are reused."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import shared_cache, tiny_config
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from eightgen.config import ExperimentConfig
from eightgen.models.detector import load_classifier
from eightgen.rundir import load_record, trajectories
from flows.pipeline import pipeline
from prefect_api.records import task_run_states, wait_for_records


@pytest.fixture(scope="module")
def tiny_cfg(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """The session's tiny config (its detector shared with the other pipeline tests), 3 start kinds x 3 seeds."""
    options = ["--seeds", "3", "--steps", "12", "--record-every", "4", "--chunk-size", "4"]
    return tiny_config(mnist_dir, shared_cache(tmp_path_factory), tmp_path_factory.mktemp("pipeline") / "runs", *options)


def _run(cfg: ExperimentConfig):
    """Run the pipeline, wait for the API to record it, and return (state, seconds, task states)."""
    started = time.perf_counter()
    state = pipeline(cfg, return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_completed(), state
    wait_for_records(state.state_details.flow_run_id)
    return state, seconds, task_run_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_cfg: ExperimentConfig):
    """The first, uncached run of the tiny pipeline."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tiny_cfg.cache_dir / "prefect-results"}):
        yield _run(tiny_cfg)


def test_pipeline_writes_results_and_report_that_agree(first_run, tiny_cfg: ExperimentConfig) -> None:
    state, _, states = first_run
    run_dir = tiny_cfg.run_dir
    report = Path(state.result())
    assert report == run_dir / "report.html" and report.is_file()
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == (2 + 1) * 3
    assert results["start_kind"].value_counts().to_dict() == {"digit": 6, "noise": 3}
    digits = results.loc[results.start_kind == "digit", "start_digit"]
    assert digits.notna().all() and digits.astype(int).value_counts().to_dict() == {1: 3, 3: 3}
    csv = pd.read_csv(run_dir / "results.csv")
    assert list(csv["run_id"]) == list(results["run_id"])
    assert load_record(run_dir).config.attack.steps == 12
    html = report.read_text()
    # the outcome sentence: "<b>k of n</b> starts (<b>r%</b>, ..." (a bare "r%" would also match CI bounds and "100.0%")
    outcome = f"<b>{int(results['success'].sum())} of {len(results)}</b> starts (<b>{100 * results['success'].mean():.1f}%</b>"
    assert outcome in html, f"overall success {outcome!r} not shown in the report"
    # every stage ran as a real task run and was recorded
    for name in ("fingerprint-source", "assemble-dataset", "train-classifier", "optimize-chunk", "collect-results", "render-report"):
        assert name in states, states
    assert len(states["optimize-chunk"]) == 3


def test_results_recompute_from_saved_model_and_trajectories(first_run, tiny_cfg: ExperimentConfig) -> None:
    run_dir = tiny_cfg.run_dir
    results = pd.read_parquet(run_dir / "results.parquet")
    traj, run_ids = trajectories(run_dir).load()
    assert list(run_ids) == list(results["run_id"])
    model, _ = load_classifier(load_record(run_dir).model.path, torch.device("cpu"))
    with torch.no_grad():
        p_final = torch.softmax(model(torch.from_numpy(traj.x_final)), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(p_final, results["p_target_final"].to_numpy(), rtol=1e-4, atol=1e-6)
    assert ((p_final > 0.5) == results["success"].to_numpy()).all()
    x0 = traj.snapshots[:, 0].astype(np.float32)
    l2 = np.sqrt(((traj.x_final - x0) ** 2).reshape(len(x0), -1).sum(1))
    np.testing.assert_allclose(l2, results["l2_final"].to_numpy(), rtol=1e-2, atol=1e-2)
    flips = [int(np.argmax(p > 0.5)) if (p > 0.5).any() else None for p in traj.p_target]
    assert flips == [None if pd.isna(f) else int(f) for f in results["flip_step"]]


def test_second_identical_run_reuses_every_stage(first_run, tiny_cfg: ExperimentConfig) -> None:
    report = (tiny_cfg.run_dir / "report.html").read_bytes()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tiny_cfg.cache_dir / "prefect-results"}):
        _, _, states = _run(tiny_cfg)
    cached = {name for name, s in states.items() if s and all(x == "Cached" for x in s)}
    assert cached == {"assemble-dataset", "train-classifier", "optimize-chunk", "collect-results", "render-report"}, states
    assert len(states["optimize-chunk"]) == 3  # 9 starts in chunks of 4
    assert (tiny_cfg.run_dir / "report.html").read_bytes() == report  # reused, not rewritten


def test_changing_attack_config_reruns_only_attack_and_report(first_run, tiny_cfg: ExperimentConfig) -> None:
    changed = tiny_cfg.model_copy(update={"attack": tiny_cfg.attack.model_copy(update={"steps": 8})})
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tiny_cfg.cache_dir / "prefect-results"}):
        _, _, states = _run(changed)
    assert states["assemble-dataset"] == ["Cached"] and states["train-classifier"] == ["Cached"]
    assert all(s == "Completed" for s in states["optimize-chunk"]), states
    assert states["render-report"] == ["Completed"]
    assert changed.run_dir != tiny_cfg.run_dir and (tiny_cfg.run_dir / "report.html").is_file()
