"""Load a verified run directory for a report: its record, results, per-step arrays and image snapshots."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eightgen.config import AttackConfig, ReportConfig
from eightgen.errors import EightgenError
from eightgen.rundir import RESULTS, TRAJECTORIES, RunRecord, load_record, local_run, trajectories, verify_run
from eightgen.trajectory import Shards
from reports import stats

REQUIRED_COLUMNS = (
    "run_id",
    "start_kind",
    "start_digit",
    "seed",
    "steps",
    "p_target_start",
    "p_target_final",
    "success",
    "flip_step",
    "l2_final",
    "l2_at_flip",
    "linf_final",
)


@dataclass
class Run:
    """What a report needs from one run directory (everything but the image snapshots)."""

    path: Path
    name: str
    record: RunRecord
    results: pd.DataFrame  # one row per start, with columns group and traj_row (row over the trajectory shards)
    p_target: np.ndarray  # [n_traj, steps + 1]
    snapshot_steps: np.ndarray
    report: ReportConfig
    target: int
    sha256: str  # of the run's verified manifest: which output this is
    table: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        self.table = stats.group_table(self.results)

    @property
    def order(self) -> list[str]:
        """Start groups in display order."""
        return stats.group_order(self.results["group"])

    @property
    def attack(self) -> AttackConfig:
        """The attack settings of the run."""
        return self.record.config.attack


def load_run(run_dir: Path) -> Run:
    """Read a verified run directory (a run in a store: this host's copy of it): its record, results.parquet and the
    per-step p(target) of its trajectory shards."""
    run_dir = local_run(run_dir)
    if not run_dir.is_dir():
        raise EightgenError(f"{run_dir}: {'a file, not a run directory' if run_dir.exists() else 'run directory not found'}")
    record = load_record(run_dir)
    sha256 = verify_run(run_dir).sha256
    try:
        results = pd.read_parquet(run_dir / RESULTS)
    except (OSError, ValueError) as exc:
        raise EightgenError(f"{run_dir / RESULTS}: unreadable ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in results]
    if missing:
        raise EightgenError(f"{run_dir / RESULTS}: missing columns {', '.join(missing)}")
    if results.empty:
        raise EightgenError(f"{run_dir / RESULTS}: no rows")
    shards = trajectories(run_dir)
    p_target = shards.field("p_target").astype(np.float32)
    snapshot_steps = shards.field("snapshot_steps").astype(np.int64)
    where = run_dir / TRAJECTORIES
    results = results.reset_index(drop=True)
    results["traj_row"] = _align(results["run_id"].astype(str).to_numpy(), shards.run_ids, len(p_target), where)
    results["group"] = stats.group_labels(results)
    if 0 not in snapshot_steps:
        raise EightgenError(f"{where}: snapshot_steps lacks step 0 (the start)")
    return Run(run_dir, record.run_name, record, results, p_target, snapshot_steps, record.config.report, record.target, sha256)


def _align(result_ids: np.ndarray, traj_ids: np.ndarray | None, n_traj: int, where: Path) -> np.ndarray:
    """Row of every results row in the trajectory arrays (matched by run_id)."""
    if traj_ids is None:
        if n_traj != len(result_ids):
            raise EightgenError(f"{where}: {n_traj} trajectories but {len(result_ids)} results rows and no run_id")
        return np.arange(n_traj)
    index = pd.Index(traj_ids)
    if not index.is_unique:
        raise EightgenError(f"{where}: run_id values repeat")
    rows = index.get_indexer(result_ids)
    if (rows < 0).any():
        raise EightgenError(f"{where}: no trajectory for run_id {result_ids[rows < 0][0]!r}")
    return rows


def read_snapshots(shards: Shards, rows: Iterable[int], step0: int, *, chunk_rows: int = 256) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Snapshots [k, C, 28, 28] of the given trajectory rows, and the L2 norm of every row's start image.

    Streams each shard's compressed array in blocks of rows, so memory stays small however many starts the run holds."""
    wanted = shards.by_shard(rows)
    picked: dict[int, np.ndarray] = {}
    norms = []
    for i, path in enumerate(shards.paths):
        offset = int(shards.offsets[i])
        local, shard_norms = _shard_snapshots(path, [int(r) - offset for r in wanted.get(i, [])], step0, chunk_rows)
        picked.update({r + offset: snaps for r, snaps in local.items()})
        norms.append(shard_norms)
    return picked, np.concatenate(norms)


def _shard_snapshots(path: Path, wanted: list[int], step0: int, chunk_rows: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    try:
        return _stream_snapshots(path, wanted, step0, chunk_rows)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EightgenError(f"{path}: cannot read snapshots ({type(exc).__name__}: {exc})") from None


def _stream_snapshots(path: Path, wanted: list[int], step0: int, chunk_rows: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    with zipfile.ZipFile(path) as zf, zf.open("snapshots.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            return _snapshots_in_memory(path, wanted, step0)
        shape, fortran, dtype = reader(f)
        if fortran:
            return _snapshots_in_memory(path, wanted, step0)
        n, row_shape = shape[0], shape[1:]
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        picked: dict[int, np.ndarray] = {}
        norms = np.empty(n, np.float64)
        queue = iter(sorted(wanted))
        nxt = next(queue, None)
        for start in range(0, n, chunk_rows):
            m = min(chunk_rows, n - start)
            block = np.frombuffer(f.read(m * row_bytes), dtype=dtype).reshape(m, *row_shape)
            first = block[:, step0].astype(np.float32).reshape(m, -1)
            norms[start : start + m] = np.sqrt(np.einsum("ij,ij->i", first, first))
            while nxt is not None and nxt < start + m:
                picked[nxt] = block[nxt - start].astype(np.float32)
                nxt = next(queue, None)
    return picked, norms


def _snapshots_in_memory(path: Path, wanted: list[int], step0: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    with np.load(path) as npz:
        snaps = npz["snapshots"]
    first = snaps[:, step0].astype(np.float32).reshape(len(snaps), -1)
    return {r: snaps[r].astype(np.float32) for r in wanted}, np.linalg.norm(first, axis=1)
