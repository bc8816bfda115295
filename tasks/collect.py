"""Stage task: chunks of optimised starts -> the run directory (results, trajectory shards, typed record), written whole.

torch and the measurements load inside `collected`: a cached run never pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from prefect import task

import eightgen
from eightgen.artifacts import Artifact, read_manifest, verified
from eightgen.chunks import Chunk, read_chunk
from eightgen.config import ExperimentConfig
from eightgen.rundir import DatasetRecord, ModelRecord, RunRecord, check_target, git_commit, now, write_run
from tasks.caching import STAGE_KEY, CachedStage
from tasks.faults import hold

COLLECT = CachedStage(None)


@dataclass(frozen=True)
class Collected:
    """A run's rows, its trajectory shards (the chunks' files, in start order) and record, before anything is written."""

    results: pd.DataFrame
    shards: list[Path]
    record: RunRecord


def collected(
    experiment: ExperimentConfig,
    chunks: list[Artifact],
    model: Artifact,
    dataset: Artifact,
    run_name: str,
    judge: Callable[[Chunk, pd.DataFrame], pd.DataFrame] | None = None,
) -> Collected:
    """Measure every start chunk by chunk (one chunk in memory at a time), with `judge`'s columns added per chunk,
    and make the run's record."""
    from eightgen.attack.indicators import collapsed
    from eightgen.attack.metrics import results_frame
    from eightgen.devices import pick_device
    from eightgen.models.detector import load_classifier, read_metrics

    cfg = experiment.attack
    model_dir = verified(model)
    net, spec = load_classifier(model_dir, pick_device(cfg.device))
    frames, shards, infos = [], [], []
    for artifact in chunks:
        chunk = read_chunk(verified(artifact), read_manifest(artifact.path, verify=False))
        traj = chunk.trajectory
        frame = results_frame(
            traj, chunk.x0, chunk.starts, model_name=spec.arch, method=cfg.method, target=experiment.dataset.target,
            collapse=collapsed(net, traj.x_final),
        )
        frames.append(pd.concat([frame, judge(chunk, frame)], axis=1) if judge else frame)
        shards.append(chunk.trajectory_file)
        infos.append(chunk.info)
    record = RunRecord(
        run_name=run_name,
        created=now(),
        version=eightgen.__version__,
        git_commit=git_commit(),
        config=experiment,
        dataset=DatasetRecord(path=dataset.path, sha256=dataset.sha256, manifest=read_manifest(verified(dataset), verify=False)),
        model=ModelRecord(
            path=model.path, sha256=model.sha256, spec=spec.model_dump(mode="json"), metrics=read_metrics(model_dir)
        ),
        device=str(infos[0].get("device", "cpu")) if infos else "cpu",
        attack_seconds=float(sum(i.get("seconds", 0.0) for i in infos)),
    )
    return Collected(pd.concat(frames, ignore_index=True), shards, record)


@task(name="collect-results", **COLLECT.options)
def collect_results(
    experiment: ExperimentConfig,
    chunks: list[Artifact],
    model: Artifact,
    dataset: Artifact,
    run_dir: Path,
    run_name: str,
    overwrite: bool = False,
    force: bool = False,
) -> Artifact:
    """Write the run directory whole: results.parquet/.csv, trajectories/ and config.json, with the key in its manifest."""
    check_target(run_dir, experiment, overwrite)
    _, key = COLLECT.here()
    run = collected(experiment, chunks, model, dataset, run_name)
    hold()
    return write_run(run_dir, run.record, run.results, run.shards, {STAGE_KEY: key})
