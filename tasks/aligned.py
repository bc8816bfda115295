"""Stage tasks of the aligned experiment: judged results per (detector, budget) run, and the aligned report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from eightgen.artifacts import Artifact, artifact_of, verified, write_manifest
from eightgen.config import AlignedConfig, AttackConfig
from eightgen.devices import pick_device
from eightgen.referees import INFO_FILE, load_referees, referee_columns
from eightgen.trajectory import load_trajectory
from reports.aligned import ALIGNED_HTML, ALIGNED_JSON, render_aligned
from tasks.attack import COLLECT, collect_results
from tasks.caching import CachedStage

RUN_FILES = ["results.parquet", "results.csv", "trajectories.npz", "config.json"]
# The judge runs collect-results' code too, so that code is part of its key.
JUDGE = CachedStage(None, (*COLLECT.modules, "tasks.attack", "eightgen.referees"))
ALIGNED_MANIFEST = "aligned.manifest.json"
ALIGNED_REPORT = CachedStage(None, ("reports.aligned", "reports.render", "reports.stats"), manifest=ALIGNED_MANIFEST)


@task(name="collect-judged-results", **JUDGE.options)
def collect_judged_results(
    cfg: AttackConfig,
    chunks: list[Artifact],
    model: Artifact,
    dataset: Artifact,
    referees: Artifact,
    run_dir: Path,
    experiment: dict,
    aligned: dict,
    force: bool = False,
) -> Artifact:
    """Collect chunk trajectories into the run directory (as collect-results does), then add every referee's verdict."""
    collect_results.fn(cfg, chunks, model, dataset, run_dir, experiment, force=True)
    refs = load_referees(verified(referees), pick_device(cfg.device))
    frame = pd.read_parquet(run_dir / "results.parquet")
    traj, _ = load_trajectory(run_dir / "trajectories.npz")
    x0 = np.concatenate([np.load(c.path / "x0.npy") for c in chunks])
    start = frame["start_digit"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    columns = referee_columns(refs, torch.from_numpy(traj.x_final), torch.from_numpy(x0), start, cfg.target)
    frame = pd.concat([frame, columns], axis=1)
    frame.to_parquet(run_dir / "results.parquet", index=False)
    frame.to_csv(run_dir / "results.csv", index=False)
    config = json.loads((run_dir / "config.json").read_text())
    config["referees"] = {
        "path": str(referees.path),
        "sha256": referees.sha256,
        "info": json.loads((referees.path / INFO_FILE).read_text()),
    }
    config["aligned"] = aligned
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    write_manifest(run_dir, {"run_name": config["run_name"], "referees": referees.sha256}, RUN_FILES)
    return artifact_of(run_dir)


@task(name="render-aligned", **ALIGNED_REPORT.options)
def render_aligned_report(cfg: AlignedConfig, runs: list[Artifact], run_dir: Path, force: bool = False) -> Artifact:
    """Write aligned.html and aligned.json (per budget and detector, the targets) from the judged run directories."""
    render_aligned([verified(r) for r in runs], run_dir, matched_budget=cfg.matched_budget, title=cfg.report.title, grid_seeds=cfg.grid_seeds)
    write_manifest(run_dir, {"kind": "aligned-report"}, [ALIGNED_HTML, ALIGNED_JSON], name=ALIGNED_MANIFEST)
    return artifact_of(run_dir, name=ALIGNED_MANIFEST)
