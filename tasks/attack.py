"""Stage tasks: optimise chunks of starts toward the target, then collect them into the run directory."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

import eightgen
from eightgen.artifacts import Artifact, artifact_of, read_manifest, staged_dir, verified, write_manifest
from eightgen.assembly import load_assembled
from eightgen.config import AttackConfig
from eightgen.devices import pick_device
from eightgen.indicators import collapsed
from eightgen.metrics import results_frame
from eightgen.models import load_classifier
from eightgen.optimize import optimize
from eightgen.starts import make_starts
from eightgen.trajectory import concat, load_trajectory, save_trajectory
from tasks.caching import CachedStage, output_is_valid
from tasks.faults import fail_once

ENGINE = ("eightgen.starts", "eightgen.losses", "eightgen.methods", "eightgen.optimize", "eightgen.trajectory")
OPTIMIZE = CachedStage("attacks", ("eightgen.models", *ENGINE))
COLLECT = CachedStage(None, ("eightgen.metrics", "eightgen.trajectory", "eightgen.indicators"))


def n_starts(cfg: AttackConfig) -> int:
    """How many starts an attack config asks for."""
    return (len(cfg.start_digits) + int(cfg.include_noise)) * cfg.seeds


def n_chunks(cfg: AttackConfig) -> int:
    """How many chunk tasks an attack config fans out to."""
    return math.ceil(n_starts(cfg) / cfg.chunk_size)


@task(name="optimize-chunk", **OPTIMIZE.options)
def optimize_chunk(
    cfg: AttackConfig, model: Artifact, dataset: Artifact, chunk: int, cache_dir: Path, force: bool = False
) -> Artifact:
    """Push one chunk of starts toward the target; write its trajectories (content-addressed)."""
    fail_once()
    out = OPTIMIZE.here()
    if not force and output_is_valid(out):
        return artifact_of(out)
    device = pick_device(cfg.device)
    net, spec = load_classifier(verified(model), device)
    data = load_assembled(verified(dataset))
    starts = make_starts(cfg, data.x_pool, data.y_pool, data.i_pool, spec.channels, net.mean.cpu(), net.std.cpu())
    rows = slice(chunk * cfg.chunk_size, (chunk + 1) * cfg.chunk_size)
    x0, meta = starts.x0[rows], starts.meta.iloc[rows].reset_index(drop=True)
    progress_id = create_progress_artifact(progress=0.0, description=f"optimisation, chunk {chunk}: {len(meta)} starts")
    every = max(1, cfg.steps // 20)

    def report(step: int) -> None:
        if step % every == 0 or step == cfg.steps:
            update_progress_artifact(progress_id, 100.0 * step / cfg.steps)

    started = time.perf_counter()
    traj = optimize(net, x0.to(device), cfg, progress=report)
    seconds = time.perf_counter() - started
    get_run_logger().info(
        "chunk %d: %d starts x %d steps on %s in %.1f s (%.0f image-steps/s)",
        chunk, len(meta), cfg.steps, device, seconds, len(meta) * cfg.steps / max(seconds, 1e-9),
    )
    with staged_dir(out) as tmp:
        save_trajectory(traj, meta["run_id"].to_numpy(), tmp / "trajectory.npz")
        np.save(tmp / "x0.npy", x0.numpy())
        meta.to_parquet(tmp / "starts.parquet")
        meta_info = {"chunk": chunk, "device": str(device), "seconds": seconds, "model": spec.arch}
        write_manifest(tmp, meta_info, ["trajectory.npz", "x0.npy", "starts.parquet"])
    return artifact_of(out)


def _git_commit() -> str | None:
    """The source checkout's commit, if it is a git checkout."""
    import subprocess

    try:
        root = Path(eightgen.__file__).resolve().parents[1]
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@task(name="collect-results", **COLLECT.options)
def collect_results(
    cfg: AttackConfig,
    chunks: list[Artifact],
    model: Artifact,
    dataset: Artifact,
    run_dir: Path,
    experiment: dict,
    force: bool = False,
) -> Artifact:
    """Concatenate chunk trajectories; write results.parquet/.csv, trajectories.npz and config.json."""
    parts = [load_trajectory(verified(c) / "trajectory.npz") for c in chunks]
    traj, run_ids = concat([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x0 = np.concatenate([np.load(c.path / "x0.npy") for c in chunks])
    meta = pd.concat([pd.read_parquet(c.path / "starts.parquet") for c in chunks], ignore_index=True)
    chunk_info = [read_manifest(c.path, verify=False) for c in chunks]
    model_dir = verified(model)
    spec = json.loads((model_dir / "spec.json").read_text())
    net, _ = load_classifier(model_dir, pick_device(cfg.device))
    collapse = collapsed(net, traj.x_final)
    frame = results_frame(traj, x0, meta, model_name=spec["arch"], method=cfg.method, target=cfg.target, collapse=collapse)
    config = {
        "run_name": experiment.get("run_name") or run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": eightgen.__version__,
        "git_commit": _git_commit(),
        "config": dict(experiment.get("config", {}), attack=cfg.model_dump(mode="json")),
        "dataset": {"path": str(dataset.path), "sha256": dataset.sha256, "manifest": read_manifest(dataset.path)},
        "model": {
            "path": str(model.path),
            "sha256": model.sha256,
            "spec": spec,
            "metrics": json.loads((model_dir / "metrics.json").read_text()),
        },
        "device": chunk_info[0].get("device", "cpu") if chunk_info else "cpu",
        "attack_seconds": float(sum(c.get("seconds", 0.0) for c in chunk_info)),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(run_dir / "results.parquet", index=False)
    frame.to_csv(run_dir / "results.csv", index=False)
    save_trajectory(traj, run_ids, run_dir / "trajectories.npz")
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    write_manifest(run_dir, {"run_name": config["run_name"]}, ["results.parquet", "results.csv", "trajectories.npz", "config.json"])
    return artifact_of(run_dir)
