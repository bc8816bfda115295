"""The start-up and orchestration benchmarks: their tables and timing splits, on a tiny cached pipeline."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from benchmarks.overhead import measure, summary
from benchmarks.startup import ROWS, _task_seconds_sqlite, table
from helpers import TINY, shared_cache


def test_the_startup_table_shows_each_phase_of_each_run() -> None:
    marks = {"start": 100.0, "imported": 100.5, "checked": 101.5, "flows imported": 101.75, "server up": 104.0,
             "flow done": 106.5, "recorded": 106.75, "end": 107.0, "tasks": 0.5}  # fmt: skip
    kept = {**marks, "server up": 101.75}
    out = table({"warm": kept, "fresh": marks}, "title line").splitlines()
    assert out[0] == "title line" and out[1].split() == ["phase", "warm", "fresh"]
    waiting = next(line for line in out if line.startswith("waiting for the server"))
    assert waiting.split()[-4:] == ["0.00", "s", "2.25", "s"]
    summary = json.loads(out[-1])
    assert summary["fresh"]["total"] == 7.0 and summary["warm"]["pipeline flow"] == 4.75
    assert set(summary["fresh"]) == {r[0] for r in ROWS} | {"total"}


def test_task_seconds_count_only_the_timed_run_and_no_subflow_stand_ins(tmp_path: Path) -> None:
    db = tmp_path / "prefect.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE task_run (id TEXT, start_time TEXT, end_time TEXT)")
        con.execute("CREATE TABLE flow_run (id TEXT, parent_task_run_id TEXT)")
        at = lambda s: datetime.fromtimestamp(s, timezone.utc).isoformat()  # noqa: E731
        rows = [("a", at(10), at(12)), ("b", at(13), at(13.5)), ("stand-in", at(10), at(19)), ("earlier", at(1), at(2))]
        con.executemany("INSERT INTO task_run VALUES (?, ?, ?)", rows)
        con.execute("INSERT INTO flow_run VALUES ('sub', 'stand-in')")
    assert _task_seconds_sqlite(db, {"start": 9.0, "end": 20.0}) == pytest.approx(2.5)


def test_the_overhead_summary_lists_every_task_and_the_share() -> None:
    m = {"preset": "quick", "wall_s": 10.0, "flow_run_s": 9.5, "tasks_s": 9.0, "task_runs": 4, "orchestration_s": 1.0,
         "per_task_s": {"train-classifier": 8.0, "optimize-chunk": 1.0}, "share": 0.1, "noop_task_s": 0.009}  # fmt: skip
    lines = summary(m).splitlines()
    assert [line.split()[0] for line in lines[3:5]] == ["train-classifier", "optimize-chunk"]
    assert lines[-2].endswith("1.00 s = 10.0 % of wall time (target < 10 %)") and lines[-1].endswith("9.0 ms")


@pytest.mark.slow
def test_overhead_splits_a_cached_tiny_run(prefect_harness, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = shared_cache(tmp_path_factory)
    argv = [*TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache), "--runs-root", str(tmp_path_factory.mktemp("runs"))]
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cache / "prefect-results"}):
        m = measure(argv)
    assert m["task_runs"] >= 8 and set(m["per_task_s"]) >= {"assemble-dataset", "train-classifier", "optimize-chunk", "render-report"}
    assert m["tasks_s"] == pytest.approx(sum(m["per_task_s"].values()))
    assert m["orchestration_s"] == pytest.approx(m["wall_s"] - m["tasks_s"]) and 0 < m["share"] < 1
    assert 0 < m["noop_task_s"] < 1
    printed = summary(m).splitlines()
    assert len(printed) == 5 + len(m["per_task_s"]) and printed[-2].startswith("  orchestration")
