"""No number that does not belong to its settings and code: run names, tampered outputs, code edits."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, embedded_task_states, shared_cache, tiny_config
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from cli.main import main
from eightgen.codekey import PROJECT_PACKAGES
from eightgen.rundir import REPORT, REPORT_MANIFEST, RESULTS, load_record, trajectories, verify_run, write_run
from eightgen.trajectory import load_trajectory
from flows.pipeline import pipeline
from prefect_api.records import task_run_states, wait_for_records

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = ["run_id", "success", "flip_step", "p_target_final", "l2_final"]


def files_of(run_dir: Path) -> dict[str, str]:
    """sha256 of every file in a run directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


def newest_pipeline_states() -> dict[str, list[str]]:
    """Task states of the newest eightgen-pipeline flow run on the API."""
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["eightgen-pipeline"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
    wait_for_records(run.id)
    return task_run_states(run.id)


@pytest.mark.slow
def test_a_run_name_never_holds_another_settings_results(prefect_harness, mnist_dir: Path, tmp_path_factory, capsys) -> None:
    cache, runs = shared_cache(tmp_path_factory), tmp_path_factory.mktemp("same-name") / "runs"
    base = ["run", *TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache), "--runs-root", str(runs), "--run-name", "same"]
    same = runs / "same"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cache / "prefect-results"}):
        assert main([*base, "--steps", "5"]) == 0
        capsys.readouterr()
        first, first_results = files_of(same), pd.read_parquet(same / RESULTS)

        # other settings, same name: one line naming what differs and the two ways out; nothing touched
        assert main([*base, "--steps", "8"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("eightgen: error:"), lines
        assert "attack.steps: 5 there, 8 asked" in lines[0] and "--run-name" in lines[0] and "--overwrite" in lines[0]
        assert files_of(same) == first

        # --overwrite replaces the whole run: results, trajectories, record and report agree on 8 steps
        assert main([*base, "--steps", "8", "--overwrite"]) == 0
        assert load_record(same).config.attack.steps == 8
        assert set(pd.read_parquet(same / RESULTS)["steps"]) == {8}
        assert trajectories(same).field("p_target").shape[1] == 9
        assert verify_run(same).sha256 in (same / REPORT_MANIFEST).read_text()
        assert "8 steps" in (same / REPORT).read_text()

        # back to 5 steps: refused again, then overwritten; the chunks come from the cache, the run and report are rewritten
        assert main([*base, "--steps", "5"]) == 2
        capsys.readouterr()
        assert main([*base, "--steps", "5", "--overwrite"]) == 0
        states = newest_pipeline_states()
    assert set(states["optimize-chunk"]) == {"Cached"}, states
    assert states["collect-results"] == ["Completed"] and states["render-report"] == ["Completed"], states
    assert load_record(same).config.attack.steps == 5
    pd.testing.assert_frame_equal(pd.read_parquet(same / RESULTS)[NUMBERS], first_results[NUMBERS])
    assert "8 steps" not in (same / REPORT).read_text() and "5 steps" in (same / REPORT).read_text()


@pytest.fixture(scope="module")
def finished(prefect_harness, mnist_dir: Path, tmp_path_factory):
    """A finished tiny run, its config and its results."""
    cfg = tiny_config(mnist_dir, shared_cache(tmp_path_factory), tmp_path_factory.mktemp("tamper"), "--steps", "7")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        state = pipeline(cfg, return_state=True)
        assert state.is_completed(), state
        wait_for_records(state.state_details.flow_run_id)
    return cfg, pd.read_parquet(cfg.run_dir / RESULTS)


def rerun(cfg) -> dict[str, list[str]]:
    """Run the pipeline again; its task states."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        state = pipeline(cfg, return_state=True)
        assert state.is_completed(), state
        wait_for_records(state.state_details.flow_run_id)
    return task_run_states(state.state_details.flow_run_id)


@pytest.mark.slow
def test_a_copied_cache_is_reused_without_recomputing(finished, tmp_path: Path) -> None:
    cfg, results = finished
    copy = tmp_path / "elsewhere" / "cache"
    shutil.copytree(cfg.cache_dir, copy, symlinks=True)
    moved = cfg.model_copy(update={"cache_dir": copy, "runs_root": tmp_path / "runs"})
    states = rerun(moved)
    assert set(states["assemble-dataset"] + states["train-classifier"] + states["optimize-chunk"]) <= {"Cached", "Completed"}
    model = Path(load_record(moved.run_dir).model.path)
    assert model.is_relative_to(copy)
    # the timings beside each output would differ had anything been trained or optimised again
    for output in [model, *chunks_of(moved, results)]:
        original = cfg.cache_dir / output.relative_to(copy)
        assert (output / "timings.json").read_bytes() == (original / "timings.json").read_bytes(), output
    pd.testing.assert_frame_equal(pd.read_parquet(moved.run_dir / RESULTS)[NUMBERS], results[NUMBERS])


@pytest.mark.slow
def test_a_run_directory_overwritten_by_another_run_is_recollected(finished) -> None:
    cfg, results = finished
    run_dir = cfg.run_dir
    # another, self-consistent run written over it (as a stage re-run into the wrong place would): manifest intact
    fake = results.assign(success=~results["success"])
    write_run(run_dir, load_record(run_dir), fake, trajectories(run_dir).paths)
    states = rerun(cfg)
    assert states["collect-results"] == ["Completed"] and states["render-report"] == ["Completed"], states
    assert set(states["optimize-chunk"]) == {"Cached"} and states["train-classifier"] == ["Cached"], states
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / RESULTS)[NUMBERS], results[NUMBERS])


def chunks_of(cfg, results: pd.DataFrame) -> list[Path]:
    """The chunk directories of a finished run: its starts, its step count."""
    found = []
    for c in sorted((cfg.cache_dir / "attacks").iterdir()):
        traj, ids = load_trajectory(c / "trajectory.npz")
        if traj.p_target.shape[1] == cfg.attack.steps + 1 and set(ids) <= set(results["run_id"]):
            found.append(c)
    return found


@pytest.mark.slow
def test_a_chunk_replaced_by_another_chunk_is_recomputed(finished) -> None:
    cfg, results = finished
    a, b = chunks_of(cfg, results)[:2]
    # each chunk directory is named by its key; put a copy of another chunk (self-consistent, other key) in its place
    shutil.rmtree(a)
    shutil.copytree(b, a)
    states = rerun(cfg)
    assert sorted(states["optimize-chunk"]) == ["Cached"] * (len(states["optimize-chunk"]) - 1) + ["Completed"], states
    pd.testing.assert_frame_equal(pd.read_parquet(cfg.run_dir / RESULTS)[NUMBERS], results[NUMBERS])


@pytest.mark.slow
def test_a_corrupt_model_or_edited_report_is_rebuilt(finished) -> None:
    cfg, results = finished
    model_dir = load_record(cfg.run_dir).model.path
    weights = Path(model_dir) / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    (cfg.run_dir / REPORT).write_text("<html>not the report</html>")
    states = rerun(cfg)
    assert states["train-classifier"] == ["Completed"] and states["render-report"] == ["Completed"], states
    assert "not the report" not in (cfg.run_dir / REPORT).read_text()
    assert load_record(cfg.run_dir).config.attack.steps == 7


@pytest.mark.slow
def test_code_edits_rerun_exactly_the_stages_that_import_them(mnist_dir: Path, tmp_path: Path, tmp_path_factory) -> None:
    checkout = tmp_path / "checkout"
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    where = ["--mnist-dir", str(mnist_dir), "--cache-dir", str(shared_cache(tmp_path_factory)), "--runs-root", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def run(label: str) -> dict[str, list[str]]:
        home = tmp_path / f"home-{label}"
        cmd = [sys.executable, "-m", "cli.main", "run", *TINY, "--steps", "9", *where]
        done = subprocess.run(cmd, cwd=checkout, env=env | {"PREFECT_HOME": str(home)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return embedded_task_states(home)

    def edit(path: str, text: str) -> None:
        with open(checkout / path, "a") as f:
            f.write(text)

    run("first")
    edit("eightgen/attack/execution.py", "\n# an engine edit\n")
    engine = run("engine")
    assert set(engine["optimize-chunk"]) == {"Completed"} and engine["train-classifier"] == ["Cached"], engine
    # a template edit and an edit to a module no stage imports, in one run: only the report is rendered again
    edit("reports/templates/run.html.j2", "{# a template edit #}\n")
    edit("benchmarks/bench.py", "\n# a module no stage imports\n")
    template = run("template")
    assert template["render-report"] == ["Completed"], template
    assert set(template["optimize-chunk"]) == {"Cached"} and template["collect-results"] == ["Cached"], template
    assert template["train-classifier"] == ["Cached"] and template["assemble-dataset"] == ["Cached"], template
    assert {s for v in template.values() for s in v if s != "Completed"} == {"Cached"}
    assert {k for k, v in template.items() if "Completed" in v} <= {"fingerprint-source", "publish-summary", "render-report"}, template
