"""Runs at scale: the start grid made a chunk at a time, pools of whole test splits, sharded trajectories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_report import make_run_dir

from benchmarks.scale import exponent, grid, stage_windows, table
from cli.main import parser
from cli.options import build_config
from eightgen.config import AttackConfig, DatasetConfig, ExperimentConfig
from eightgen.data.assembly import assemble
from eightgen.data.grid import digit_counts, n_starts, start_table
from eightgen.data.sources import MnistData, load_mnist
from eightgen.data.starts import make_starts
from eightgen.errors import EightgenError
from eightgen.rundir import LEGACY_TRAJECTORIES, MANIFEST, load_record, trajectories, verify_run
from eightgen.trajectory import Shards, save_trajectory
from reports.render import render_report
from reports.runs import load_run, read_snapshots

ONE = (torch.zeros(1), torch.ones(1))


@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shuffled pool with a different number of images per digit (digit d: 3 + d)."""
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), [3 + d for d in range(10)]))
    return rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8), y, np.arange(len(y), dtype=np.int64) * 7


def test_any_chunk_of_the_grid_equals_that_slice_of_the_whole_grid(pool) -> None:
    x, y, index = pool
    cfg = AttackConfig(start_digits=(9, 0, 4), seeds=5, starts_per_digit=3, method="gd")
    whole = make_starts(cfg, x, y, index, 1, *ONE)
    assert len(whole) == 5 + 3 * 3 == n_starts(cfg, {d: 3 + d for d in range(10)})
    for rows in (slice(0, 4), slice(4, 9), slice(9, 14), slice(13, 99)):
        part = make_starts(cfg, x, y, index, 1, *ONE, rows=rows)
        assert torch.equal(part.x0, whole.x0[rows])
        pd.testing.assert_frame_equal(part.meta, whole.meta.iloc[rows].reset_index(drop=True))


def test_all_starts_per_digit_takes_each_digits_whole_pool(pool) -> None:
    x, y, index = pool
    cfg = AttackConfig(start_digits=(1, 7), seeds=2, starts_per_digit="all")
    meta, rows = start_table(cfg, y, index)
    assert meta.run_id.tolist()[:2] == ["noise-s0000", "noise-s0001"] and (rows[:2] == -1).all()
    assert (meta.start_digit == 1).sum() == 4 and (meta.start_digit == 7).sum() == 10
    np.testing.assert_array_equal(rows[2:6], np.flatnonzero(y == 1))
    assert meta.source_index[2:].tolist() == index[rows[2:]].tolist()
    # noise seeds have no limit; digits stop at their pool
    assert n_starts(AttackConfig(seeds=50_000, start_digits=(), include_noise=True), {}) == 50_000
    with pytest.raises(EightgenError, match="the pool holds 5 images of digit 2, fewer than starts_per_digit=6"):
        digit_counts(AttackConfig(start_digits=(2,), starts_per_digit=6), {2: 5})


def test_a_pool_of_the_whole_test_split_leaves_training_unchanged(mnist_dir: Path) -> None:
    data = load_mnist(DatasetConfig(source="idx", mnist_dir=mnist_dir))
    split = np.where(np.arange(len(data.labels)) < 7000, "train", "test")
    both = MnistData(data.images, data.labels, split, data.index, "real MNIST cut in two")
    small, every = assemble(both, DatasetConfig(pool_per_digit=16)), assemble(both, DatasetConfig(pool_per_digit="all"))
    np.testing.assert_array_equal(every.y_pool, np.sort(data.labels[7000:], kind="stable")[np.argsort(every.y_pool, kind="stable").argsort()])
    assert np.bincount(every.y_pool, minlength=10).tolist() == np.bincount(data.labels[7000:], minlength=10).tolist()
    assert set(every.s_pool) == {"test"}
    for part in ("train", "valid"):  # the detector's data does not depend on how many starts are held out
        np.testing.assert_array_equal(getattr(small, f"i_{part}"), getattr(every, f"i_{part}"))
    # the pool keeps its order as it grows: the first 16 of each digit are the small pool's
    for d in range(10):
        np.testing.assert_array_equal(every.i_pool[every.y_pool == d][:16], small.i_pool[small.y_pool == d])
    with pytest.raises(EightgenError, match="pool_per_digit='all' needs a source with a training and a test split"):
        assemble(data, DatasetConfig(pool_per_digit="all"))


def test_starts_per_digit_options_raise_the_pool_to_match() -> None:
    def cfg(*argv: str) -> ExperimentConfig:
        return build_config(parser().parse_args(["run", *argv]))

    assert cfg("--starts-per-digit", "200").dataset.pool_per_digit == 200
    assert cfg("--starts-per-digit", "all").dataset.pool_per_digit == "all"
    assert cfg("--seeds", "500").dataset.pool_per_digit == 500
    assert cfg("--seeds", "4").dataset.pool_per_digit == 64  # never lowered
    small = cfg("--seeds", "5000", "--starts-per-digit", "2")
    assert (small.attack.seeds, small.attack.per_digit, small.dataset.pool_per_digit) == (5000, 2, 64)
    with pytest.raises(ValueError, match="starts_per_digit=100 starts per digit, but dataset.pool_per_digit holds out 50"):
        cfg("--starts-per-digit", "100", "--pool-per-digit", "50")


def test_shards_read_lazily_and_agree_with_one_file(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "sharded", seeds=3, digits=(1, 2, 3), shards=4)
    one = make_run_dir(tmp_path, "one", seeds=3, digits=(1, 2, 3), shards=1)
    shards = trajectories(run_dir)
    assert [p.name for p in shards.paths] == [f"part-0000{i}.npz" for i in range(4)]
    joined, ids = shards.load()
    np.testing.assert_array_equal(ids, trajectories(one).run_ids)
    np.testing.assert_array_equal(shards.field("p_target"), joined.p_target)
    np.testing.assert_array_equal(joined.snapshots, trajectories(one).load()[0].snapshots)
    assert shards.offsets.tolist() == [0, 3, 6, 9, 12]
    assert {s: r.tolist() for s, r in shards.by_shard([11, 0, 4, 3]).items()} == {0: [0], 1: [3, 4], 3: [11]}
    with pytest.raises(EightgenError, match="outside"):
        shards.by_shard([shards.n])
    # the report reads them the same way
    a, b = load_run(run_dir), load_run(one)
    np.testing.assert_array_equal(a.p_target, b.p_target)
    picked_a, norms_a = read_snapshots(shards, [1, 5, 10], 0)
    picked_b, norms_b = read_snapshots(trajectories(one), [1, 5, 10], 0)
    assert all(np.array_equal(picked_a[r], picked_b[r]) for r in (1, 5, 10)) and np.array_equal(norms_a, norms_b)


def test_a_run_written_as_one_trajectories_file_still_reads(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "legacy", seeds=2, digits=(3,))
    traj, ids = trajectories(run_dir).load()
    # the layout before shards: trajectories.npz beside results, listed in the manifest
    save_trajectory(traj, ids, run_dir / LEGACY_TRAJECTORIES)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("trajectories/")}
    from eightgen.artifacts import sha256_file, write_manifest

    for name in list(manifest["files"]):
        if name.startswith("trajectories/"):
            (run_dir / name).unlink()
    write_manifest(run_dir, {k: v for k, v in manifest.items() if k != "files"}, [*files, LEGACY_TRAJECTORIES])
    verify_run(run_dir)
    assert trajectories(run_dir).paths == [run_dir / LEGACY_TRAJECTORIES]
    assert "<h1" in render_report([run_dir]).read_text()
    assert sha256_file(run_dir / LEGACY_TRAJECTORIES)


def test_a_shard_missing_from_the_manifest_or_the_folder_is_named(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "damaged", seeds=2, digits=(3,), shards=2)
    (run_dir / "trajectories" / "part-00001.npz").write_bytes(b"not a zip")
    with pytest.raises(EightgenError, match=r"trajectories/part-00001\.npz: sha256 differs"):
        verify_run(run_dir)
    with pytest.raises(EightgenError, match=r"part-00001\.npz: corrupt trajectory file"):
        Shards(trajectories(run_dir).paths)


def test_scale_benchmark_grid_fit_and_table() -> None:
    assert grid(100) == (10, 10) and grid(10_000) == (10_000 - 9 * 892, 892)
    with pytest.raises(ValueError, match="at least 10"):
        grid(9)
    seeds, per_digit = grid(1000)
    assert seeds + 9 * per_digit == 1000 and per_digit == 100
    assert exponent([100, 1000, 10000], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert exponent([100, 1000, 10000], [700.0, 700.0, 700.0]) == pytest.approx(0.0, abs=1e-9)
    stage = {"seconds": 2.0, "peak_mib": 800.0, "state": "Completed"}
    rows = {n: {"wall": n / 100, "peak_mib": 900.0, "stages": {"optimise": stage | {"seconds": n / 1000}}, "run_bytes": 10 * n, "chunk_bytes": 9 * n}
            for n in (100, 1000)}
    text = table(rows, 50, "title")
    assert "image-steps/s (optimise)" in text and "50,000" in text  # 100 starts x 50 steps in 0.1 s
    assert "optimise   time  1.00   peak memory  0.00" in text


def test_stage_windows_span_each_stages_task_runs(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "prefect.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE task_run (name TEXT, start_time TEXT, end_time TEXT, state_name TEXT)")
        con.executemany("INSERT INTO task_run VALUES (?, ?, ?, ?)", [
            ("optimize-chunk-0a1", "2026-01-01T00:00:10Z", "2026-01-01T00:00:20Z", "Completed"),
            ("optimize-chunk-9f2", "2026-01-01T00:00:21Z", "2026-01-01T00:00:35Z", "Completed"),
            ("train-classifier-77", None, "2026-01-01T00:00:05Z", "Cached"),
            ("render-report-1", "2026-01-01T01:00:00Z", "2026-01-01T01:00:09Z", "Completed"),  # another run, later
        ])
    t0 = pd.Timestamp("2026-01-01T00:00:00Z").timestamp()
    windows = stage_windows(db, t0, t0 + 60)
    assert windows["optimise"] == (t0 + 10, t0 + 35, "Completed")
    assert windows["train"] == (t0 + 5, t0 + 5, "Cached") and "report" not in windows


def test_one_size_has_no_fit() -> None:
    stage = {"seconds": 2.0, "peak_mib": 800.0, "state": "Completed"}
    text = table({1000: {"wall": 3.0, "peak_mib": 900.0, "stages": {"optimise": stage}, "run_bytes": 1, "chunk_bytes": 1}}, 10, "t")
    assert "exponent" not in text and "5,000" in text  # 1,000 starts x 10 steps in 2 s
