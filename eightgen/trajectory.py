"""What the optimisation loop recorded for a batch of starts, its trajectory file, and a run's shards of them."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from eightgen.errors import EightgenError

# Field -> (dtype, number of dimensions); snapshot_steps is shared by all starts, every other field is per start.
_LAYOUT: dict[str, tuple[type, int]] = {
    "snapshot_steps": (np.int32, 1),
    "snapshots": (np.float16, 5),
    "p_target": (np.float32, 2),
    "loss": (np.float32, 2),
    "logits": (np.float32, 3),
    "flip_step": (np.int32, 1),
    "flip_snapshot": (np.float16, 4),
    "l2_at_flip": (np.float32, 1),
    "x_final": (np.float32, 4),
    "grad_norm_final": (np.float32, 1),
    "stopped_step": (np.int32, 1),
}


@dataclass(frozen=True)
class Trajectory:
    """Per-step scalars, image snapshots and final state of n starts (numpy arrays; see contracts)."""

    snapshot_steps: np.ndarray  # int32 [k]: 0, record_every, ..., steps
    snapshots: np.ndarray  # float16 [n, k, C, 28, 28]: x_t at snapshot_steps
    p_target: np.ndarray  # float32 [n, steps+1]
    loss: np.ndarray  # float32 [n, steps+1]
    logits: np.ndarray  # float32 [n, steps+1, 2]
    flip_step: np.ndarray  # int32 [n]: first t with argmax(logits_t) == 1, -1 if never
    flip_snapshot: np.ndarray  # float16 [n, C, 28, 28]: x at flip_step, zeros if never
    l2_at_flip: np.ndarray  # float32 [n]: ||x_flip - x0||_2 computed in float32, NaN if never
    x_final: np.ndarray  # float32 [n, C, 28, 28]: x_steps
    grad_norm_final: np.ndarray  # float32 [n]: ||d loss / d x|| at x_final
    stopped_step: np.ndarray  # int32 [n]: step early stopping froze the start at, -1 if never

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in _LAYOUT.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
                got = f"{value.dtype} {value.ndim}-d" if isinstance(value, np.ndarray) else type(value).__name__
                raise EightgenError(f"trajectory field {name}: expected {np.dtype(dtype)} {ndim}-d, got {got}")
        n = len(self.p_target)
        wrong = [name for name in _LAYOUT if name != "snapshot_steps" and len(getattr(self, name)) != n]
        if wrong:
            raise EightgenError(f"trajectory fields {wrong} do not have {n} starts like p_target")
        if self.snapshots.shape[1] != len(self.snapshot_steps):
            raise EightgenError(
                f"trajectory has {self.snapshots.shape[1]} snapshots per start but {len(self.snapshot_steps)} snapshot steps"
            )

    @property
    def n(self) -> int:
        """Number of starts."""
        return len(self.p_target)

    @property
    def steps(self) -> int:
        """Number of optimisation steps (step 0 is the start)."""
        return self.p_target.shape[1] - 1

    def rows(self, index: slice | np.ndarray) -> "Trajectory":
        """The trajectory of a subset of the starts."""
        return Trajectory(**{f.name: _take(f.name, getattr(self, f.name), index) for f in fields(self)})


def _take(name: str, value: np.ndarray, index: slice | np.ndarray) -> np.ndarray:
    """Index a per-start field; the shared snapshot_steps passes through."""
    return value if name == "snapshot_steps" else value[index]


def concat(parts: list[Trajectory]) -> Trajectory:
    """Chunks of one run joined along the start axis (they must share steps and snapshot steps)."""
    if not parts:
        raise EightgenError("no trajectories to concatenate")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if not np.array_equal(part.snapshot_steps, first.snapshot_steps) or part.steps != first.steps:
            raise EightgenError(f"trajectory chunk {i} has different steps or snapshot steps than chunk 0")
        if part.x_final.shape[1:] != first.x_final.shape[1:]:
            raise EightgenError(f"trajectory chunk {i} has images {part.x_final.shape[1:]}, chunk 0 {first.x_final.shape[1:]}")
    return Trajectory(
        **{
            f.name: first.snapshot_steps if f.name == "snapshot_steps" else np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(Trajectory)
        }
    )


def save_trajectory(traj: Trajectory, run_ids: np.ndarray | list[str], path: Path) -> Path:
    """Write a trajectory file (compressed npz, plus run_id [n]) atomically at exactly `path`."""
    run_id = np.asarray(run_ids, dtype=str)
    if run_id.shape != (traj.n,):
        raise EightgenError(f"{len(run_id)} run ids for a trajectory of {traj.n} starts")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, run_id=run_id, **{f_.name: getattr(traj, f_.name) for f_ in fields(Trajectory)})
    tmp.replace(path)
    return path


def load_trajectory(path: Path) -> tuple[Trajectory, np.ndarray]:
    """Read a trajectory file back: the Trajectory and its run ids."""
    path = Path(path)
    if not path.is_file():
        raise EightgenError(f"{path}: no such trajectory file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("run_id", *_LAYOUT) if name not in data.files]
            if missing:
                raise EightgenError(f"{path}: not a trajectory file (missing {', '.join(missing)})")
            arrays = {name: data[name] for name in _LAYOUT}
            run_id = data["run_id"]
    except EightgenError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise EightgenError(f"{path}: corrupt trajectory file ({exc})") from None
    try:
        traj = Trajectory(**arrays)
    except EightgenError as exc:
        raise EightgenError(f"{path}: {exc}") from None
    if run_id.shape != (traj.n,):
        raise EightgenError(f"{path}: {len(run_id)} run ids for {traj.n} starts")
    return traj, run_id


def read_member(path: Path, name: str) -> np.ndarray:
    """One array of a trajectory file (only that member is read and decompressed)."""
    path = Path(path)
    if not path.is_file():
        raise EightgenError(f"{path}: no such trajectory file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if name not in data.files:
                raise EightgenError(f"{path}: not a trajectory file (missing {name})")
            return data[name]
    except EightgenError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise EightgenError(f"{path}: corrupt trajectory file ({exc})") from None


class Shards:
    """A run's trajectories as several trajectory files (one per chunk, in start order), read lazily.

    Opening one reads only the run ids; a per-start field is read shard by shard, so no more than one shard's
    snapshots are ever in memory."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise EightgenError("no trajectory files")
        ids = [read_member(p, "run_id").astype(str) for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        self.run_ids = np.concatenate(ids)

    @property
    def n(self) -> int:
        """Number of starts over all shards."""
        return int(self.offsets[-1])

    def field(self, name: str) -> np.ndarray:
        """A per-start field joined over the shards (snapshot_steps: the first shard's); avoid for snapshots."""
        if name not in _LAYOUT:
            raise EightgenError(f"no trajectory field {name!r}")
        if name == "snapshot_steps":
            return read_member(self.paths[0], name)
        parts = [read_member(p, name) for p in self.paths]
        for p, part, start, stop in zip(self.paths, parts, self.offsets[:-1], self.offsets[1:]):
            if len(part) != stop - start:
                raise EightgenError(f"{p}: {len(part)} rows of {name} for {stop - start} run ids")
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[tuple[Trajectory, np.ndarray]]:
        """Each shard's whole Trajectory and run ids, one at a time."""
        for p in self.paths:
            yield load_trajectory(p)

    def load(self) -> tuple[Trajectory, np.ndarray]:
        """Every shard joined in memory (small runs only)."""
        parts = list(self)
        return concat([t for t, _ in parts]), np.concatenate([i for _, i in parts])

    def by_shard(self, rows: Iterable[int]) -> dict[int, np.ndarray]:
        """Global rows grouped by the shard holding them: shard index -> sorted global rows."""
        rows = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n):
            raise EightgenError(f"trajectory rows outside 0..{self.n - 1}")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return {int(s): rows[shard == s] for s in np.unique(shard)}
