"""The run directory's owner: typed record, whole-directory writes, settings checks, run lookup; cache keys without the cache's place."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from eightgen.artifacts import Artifact
from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.rundir import CONFIG, REPORT, check_target, find_run, load_record, settings_diff, verify_run
from fixtures_report import make_run_dir, rewrite_results
from tasks.attack import optimize_chunk
from tasks.caching import stage_key


def test_the_record_is_typed_and_round_trips(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "typed", seeds=2, digits=(1,))
    record = load_record(run_dir)
    assert isinstance(record.config, ExperimentConfig) and record.config.attack.seeds == 2
    assert record.model.spec["arch"] == "small_cnn" and record.target == 8
    assert f'"run_name": "{record.run_name}"' in (run_dir / "manifest.json").read_text()
    (run_dir / CONFIG).write_text('{"run_name": "x"}')
    with pytest.raises(EightgenError, match=r"config\.json: not a valid run record \(created: Field required\)"):
        load_record(run_dir)


def test_settings_diff_names_every_differing_field() -> None:
    a = ExperimentConfig()
    b = a.model_copy(update={"attack": a.attack.model_copy(update={"steps": 80, "seeds": 3}), "run_name": "other"})
    assert settings_diff(a, b) == ["attack.seeds: 16 there, 3 asked", "attack.steps: 50 there, 80 asked"]
    assert settings_diff(a, a.model_copy(update={"cache_dir": Path("elsewhere")})) == []


def test_a_run_directory_of_other_settings_or_other_files_is_refused(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "held", seeds=2, digits=(1,))
    held = load_record(run_dir).config
    check_target(run_dir, held)  # same settings: fine
    other = held.model_copy(update={"attack": held.attack.model_copy(update={"steps": 9})})
    with pytest.raises(EightgenError, match=r"holds a run of other settings \(attack\.steps: 50 there, 9 asked\); choose another --run-name, or pass --overwrite"):
        check_target(run_dir, other)
    check_target(run_dir, other, overwrite=True)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(EightgenError, match="holds files that are not a readable run"):
        check_target(stray, held)
    check_target(tmp_path / "new", held)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EightgenError, match="file is a file, not a run directory: choose another --run-name or --runs-root"):
        check_target(tmp_path / "file", held)


def test_a_rewrite_replaces_the_whole_directory_report_included(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "whole", seeds=2, digits=(1,))
    (run_dir / REPORT).write_text("<html>old report</html>")
    results = pd.read_parquet(run_dir / "results.parquet")
    rewrite_results(run_dir, results.assign(success=False))
    assert not (run_dir / REPORT).exists()  # never an old report beside new results
    assert not pd.read_parquet(run_dir / "results.parquet")["success"].any()
    assert [p.name for p in tmp_path.iterdir()] == ["whole"]  # no staging folders left behind
    verify_run(run_dir)


def test_find_run_by_name_or_the_newest(tmp_path: Path) -> None:
    old = make_run_dir(tmp_path, "old", seeds=2, digits=(1,))
    new = make_run_dir(tmp_path, "new", seeds=2, digits=(1,))
    past = time.time() - 3600
    os.utime(old / "manifest.json", (past, past))
    (tmp_path / "not-a-run").mkdir()
    assert find_run(tmp_path) == new
    assert find_run(tmp_path, "old") == old
    with pytest.raises(EightgenError, match="no run named 'nope'"):
        find_run(tmp_path, "nope")
    with pytest.raises(EightgenError, match="no runs in"):
        find_run(tmp_path / "empty")


def test_stage_keys_ignore_where_the_cache_lives_and_how_hard_to_try() -> None:
    cfg = ExperimentConfig().attack
    model, dataset = Artifact(path=Path("m"), sha256="a" * 64), Artifact(path=Path("d"), sha256="b" * 64)
    params = {"cfg": cfg, "model": model, "dataset": dataset, "chunk": 0}
    key = stage_key(optimize_chunk.fn, params | {"cache_dir": Path("/one/cache"), "force": False})
    assert key == stage_key(optimize_chunk.fn, params | {"cache_dir": Path("/elsewhere"), "force": True})
    moved = params | {"model": Artifact(path=Path("/moved/m"), sha256="a" * 64)}
    assert key == stage_key(optimize_chunk.fn, moved)  # artifacts count by content, not place
    assert key != stage_key(optimize_chunk.fn, params | {"chunk": 1})
    assert key != stage_key(optimize_chunk.fn, params | {"cfg": cfg.model_copy(update={"steps": 51})})
