"""Stage task: chunks of optimised starts -> the run directory (results, trajectories, typed record), written whole.

torch and the measurements load inside `collected`: a cached run never pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task

import eightgen
from eightgen.artifacts import Artifact, read_manifest, verified
from eightgen.chunks import Chunks, read_chunks
from eightgen.config import ExperimentConfig
from eightgen.rundir import DatasetRecord, ModelRecord, RunRecord, check_target, git_commit, now, write_run
from tasks.caching import STAGE_KEY, CachedStage
from tasks.faults import hold

COLLECT = CachedStage(None)


@dataclass(frozen=True)
class Collected:
    """A run's rows, joined chunks and record, before anything is written."""

    results: pd.DataFrame
    chunks: Chunks
    record: RunRecord


def collected(experiment: ExperimentConfig, chunks: list[Artifact], model: Artifact, dataset: Artifact, run_name: str) -> Collected:
    """Join verified chunks, measure every start, and make the run's record."""
    from eightgen.devices import pick_device
    from eightgen.indicators import collapsed
    from eightgen.metrics import results_frame
    from eightgen.models import load_classifier, read_metrics

    cfg = experiment.attack
    joined = read_chunks([verified(c) for c in chunks], [read_manifest(c.path, verify=False) for c in chunks])
    model_dir = verified(model)
    net, spec = load_classifier(model_dir, pick_device(cfg.device))
    collapse = collapsed(net, joined.trajectory.x_final)
    frame = results_frame(
        joined.trajectory, joined.x0, joined.starts, model_name=spec.arch, method=cfg.method, target=cfg.target, collapse=collapse
    )
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
        device=str(joined.infos[0].get("device", "cpu")) if joined.infos else "cpu",
        attack_seconds=float(sum(i.get("seconds", 0.0) for i in joined.infos)),
    )
    return Collected(frame, joined, record)


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
    """Write the run directory whole: results.parquet/.csv, trajectories.npz and config.json, with the key in its manifest."""
    check_target(run_dir, experiment, overwrite)
    _, key = COLLECT.here()
    run = collected(experiment, chunks, model, dataset, run_name)
    hold()
    return write_run(run_dir, run.record, run.results, run.chunks.trajectory, run.chunks.run_ids, {STAGE_KEY: key})
