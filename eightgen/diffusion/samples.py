"""Guided-diffusion samples on disk: one npz per chunk (and per path in a run), the only code that writes or reads them."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from eightgen.diffusion.sampler import Guide, Sampled, Schedule, ddim_sample, gaussian_from_uniform, noised_start, start_noise
from eightgen.errors import EightgenError

SAMPLES_FILE = "samples.npz"
META = ("run_id", "start_kind", "start_digit", "seed")


@dataclass(frozen=True, eq=False)
class Samples:
    """Sampled starts of one path: metadata rows, start and final images, x̂₀ snapshots and p(target) per step."""

    meta: pd.DataFrame  # run_id, start_kind, start_digit (-1 for noise), seed
    x0: np.ndarray  # [n, 1, 28, 28] float32, the start as shown (pixels)
    x_final: np.ndarray  # [n, 1, 28, 28] float32
    snapshot_steps: np.ndarray  # [k]
    snapshots: np.ndarray  # [n, k, 1, 28, 28] float16
    p_target: np.ndarray  # [n, steps + 1] float32 (NaN-padded where a start took fewer steps)

    def __len__(self) -> int:
        return len(self.meta)


def from_sampled(meta: pd.DataFrame, x0: np.ndarray, parts: list[Sampled], steps: int) -> Samples:
    """One Samples from sampler outputs over consecutive groups of rows (noise starts, digit starts): padded to `steps`."""
    snap_steps = sorted({int(s) for p in parts for s in p.snapshot_steps})
    n = sum(len(p.x_final) for p in parts)
    snaps = np.full((n, len(snap_steps), 1, 28, 28), np.nan, np.float16)
    probs = np.full((n, steps + 1), np.nan, np.float32)
    row = 0
    for p in parts:
        m = len(p.x_final)
        for j, s in enumerate(p.snapshot_steps):
            snaps[row : row + m, snap_steps.index(int(s))] = p.snapshots[:, j].numpy()
        probs[row : row + m, : p.p_target.shape[1]] = p.p_target.numpy()
        row += m
    x_final = np.concatenate([p.x_final.numpy() for p in parts]) if parts else np.zeros((0, 1, 28, 28), np.float32)
    frame = meta.reset_index(drop=True)[list(META)].copy()
    return Samples(frame, np.asarray(x0, np.float32), x_final, np.asarray(snap_steps, np.int64), snaps, probs)


def sample_starts(
    denoiser: nn.Module,
    schedule: Schedule,
    x0: Tensor,
    meta: pd.DataFrame,
    *,
    guide: Guide | None,
    watch: nn.Module | None,
    steps: int,
    level: float,
    record_every: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Samples:
    """Guided (or unguided) DDIM from the starts of one chunk: noise starts from pure noise, real starts partially noised.

    A uniform-noise start becomes the Gaussian noise of the same pixels (inverse normal CDF) and is denoised from
    t = T-1 in `steps` steps; a real start is noised to `level` with noise fixed by its run id and denoised in
    ⌈steps·level⌉ steps (the same step density). Rows keep the order of meta.
    """
    x0 = torch.as_tensor(x0, dtype=torch.float32).mean(dim=1, keepdim=True)
    kinds = meta["start_kind"].astype(str).to_numpy()
    if not set(kinds) <= {"noise", "digit"}:
        raise EightgenError(f"unknown start kinds {sorted(set(kinds) - {'noise', 'digit'})}")
    order = np.concatenate([np.flatnonzero(kinds == "noise"), np.flatnonzero(kinds == "digit")])
    if not np.array_equal(order, np.arange(len(kinds))):
        raise EightgenError("noise starts must come before digit starts")
    parts: list[Sampled] = []
    noise = torch.from_numpy(kinds == "noise")
    if noise.any():
        x_t = gaussian_from_uniform(x0[noise]).to(device)
        parts.append(ddim_sample(denoiser, x_t, schedule.timesteps - 1, schedule, steps, guide, watch, record_every, progress))
    digit = ~noise
    if digit.any():
        ids = meta["run_id"].astype(str).to_numpy()[digit.numpy()]
        eps = torch.stack([start_noise(i) for i in ids])
        x_t, t = noised_start(x0[digit], eps, level, schedule)
        n_steps = max(1, math.ceil(steps * level))
        parts.append(ddim_sample(denoiser, x_t.to(device), t, schedule, n_steps, guide, watch, record_every, progress))
    frame = meta.copy()
    frame["start_digit"] = frame["start_digit"].astype("Int64").fillna(-1).astype(np.int64)
    return from_sampled(frame, x0.numpy(), parts, steps)


def write_samples(directory: Path, samples: Samples, name: str = SAMPLES_FILE) -> Path:
    """Write samples as one compressed npz in directory."""
    path = Path(directory) / name
    m = samples.meta
    np.savez_compressed(
        path,
        run_id=np.array(m["run_id"].astype(str).tolist(), dtype=str),
        start_kind=np.array(m["start_kind"].astype(str).tolist(), dtype=str),
        start_digit=m["start_digit"].to_numpy(dtype=np.int64),
        seed=m["seed"].to_numpy(dtype=np.int64),
        x0=samples.x0,
        x_final=samples.x_final,
        snapshot_steps=samples.snapshot_steps,
        snapshots=samples.snapshots,
        p_target=samples.p_target,
    )
    return path


def read_samples(directory: Path, name: str = SAMPLES_FILE) -> Samples:
    """The samples in directory/name (the caller verifies the directory's manifest first)."""
    path = Path(directory) / name
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = pd.DataFrame({k: z[k] for k in META})
            return Samples(meta, z["x0"], z["x_final"], z["snapshot_steps"], z["snapshots"], z["p_target"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise EightgenError(f"{path}: cannot read samples ({type(exc).__name__}: {exc})") from None


def concat_samples(parts: list[Samples]) -> Samples:
    """Chunks of one path, in order, as one Samples."""
    if not parts:
        raise EightgenError("no sample chunks to join")
    steps = max(p.p_target.shape[1] for p in parts)
    snap_steps = sorted({int(s) for p in parts for s in p.snapshot_steps})
    n = sum(len(p) for p in parts)
    snaps = np.full((n, len(snap_steps), 1, 28, 28), np.nan, np.float16)
    probs = np.full((n, steps), np.nan, np.float32)
    row = 0
    for p in parts:
        for j, s in enumerate(p.snapshot_steps):
            snaps[row : row + len(p), snap_steps.index(int(s))] = p.snapshots[:, j]
        probs[row : row + len(p), : p.p_target.shape[1]] = p.p_target
        row += len(p)
    return Samples(
        pd.concat([p.meta for p in parts], ignore_index=True),
        np.concatenate([p.x0 for p in parts]),
        np.concatenate([p.x_final for p in parts]),
        np.asarray(snap_steps, np.int64),
        snaps,
        probs,
    )
