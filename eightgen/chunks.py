"""The chunk store: one optimised chunk of starts per directory, its file names, and the code that writes and reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from eightgen.artifacts import read_timings, write_manifest, write_timings
from eightgen.trajectory import Trajectory, concat, load_trajectory, save_trajectory

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
class Chunks:
    """Several chunks joined in order: trajectories, start images, start table and each chunk's manifest info."""

    trajectory: Trajectory
    run_ids: np.ndarray
    x0: np.ndarray
    starts: pd.DataFrame
    infos: list[dict[str, Any]]


def read_chunks(directories: Sequence[Path], infos: Sequence[dict[str, Any]]) -> Chunks:
    """Join verified chunk directories (their manifests already read into `infos`, times added) in the order given."""
    parts = [load_trajectory(Path(d) / TRAJECTORY) for d in directories]
    return Chunks(
        trajectory=concat([p[0] for p in parts]),
        run_ids=np.concatenate([p[1] for p in parts]),
        x0=np.concatenate([np.load(Path(d) / X0) for d in directories]),
        starts=pd.concat([pd.read_parquet(Path(d) / STARTS) for d in directories], ignore_index=True),
        infos=[{**info, **read_timings(Path(d))} for d, info in zip(directories, infos)],
    )
