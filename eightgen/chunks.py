"""The chunk store: one optimised chunk of starts per directory, its file names, and the code that writes and reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eightgen.artifacts import read_timings, write_manifest, write_timings
from eightgen.trajectory import Trajectory, load_trajectory, save_trajectory

TRAJECTORY = "trajectory.npz"
X0 = "x0.npy"
STARTS = "starts.parquet"
FILES = (TRAJECTORY, X0, STARTS)
TIMED = ("seconds",)  # info fields that are wall-clock times: kept in timings.json, out of the manifest's hash


def write_chunk(directory: Path, traj: Trajectory, x0: np.ndarray, starts: pd.DataFrame, info: dict[str, Any]) -> None:
    """Write one chunk's trajectories, start images and start table, with a manifest carrying `info`.

    Its times (`seconds`) go to timings.json instead: the same starts, model and settings give the same hash."""
    save_trajectory(traj, starts["run_id"].to_numpy(), directory / TRAJECTORY)
    np.save(directory / X0, np.asarray(x0))
    starts.to_parquet(directory / STARTS)
    write_timings(directory, {k: v for k, v in info.items() if k in TIMED})
    write_manifest(directory, {k: v for k, v in info.items() if k not in TIMED}, list(FILES))


@dataclass(frozen=True)
class Chunk:
    """One verified chunk read back: its trajectories, start images, start table and manifest info (times added)."""

    directory: Path
    trajectory: Trajectory
    run_ids: np.ndarray
    x0: np.ndarray
    starts: pd.DataFrame
    info: dict[str, Any]

    @property
    def trajectory_file(self) -> Path:
        """The chunk's trajectory file, which a run directory keeps as one of its shards."""
        return self.directory / TRAJECTORY


def read_chunk(directory: Path, info: dict[str, Any]) -> Chunk:
    """Read a verified chunk directory (its manifest already read into `info`)."""
    directory = Path(directory)
    trajectory, run_ids = load_trajectory(directory / TRAJECTORY)
    return Chunk(
        directory=directory,
        trajectory=trajectory,
        run_ids=run_ids,
        x0=np.load(directory / X0),
        starts=pd.read_parquet(directory / STARTS),
        info={**info, **read_timings(directory)},
    )
