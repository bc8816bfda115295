"""The parent flow: it only puts the stage flows in order."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from eightgen.config import PRESETS, ExperimentConfig
from flows.runners import TaskRunnerKind, attack_flow_on
from flows.stages import assemble_flow, report_flow, train_flow


@flow(name="eightgen-pipeline")
def pipeline(
    cfg: ExperimentConfig = PRESETS["quick"],
    force: bool = False,
    task_runner: TaskRunnerKind = "threads",
    dask_address: str | None = None,
) -> Path:
    """MNIST -> 8-detector -> pixel optimisation -> results -> HTML report."""
    dataset = assemble_flow(cfg.dataset, cfg.cache_dir)
    model = train_flow(cfg.train, dataset, cfg.cache_dir)
    experiment = {"run_name": cfg.run_label, "config": cfg.model_dump(mode="json")}
    attack = attack_flow_on(task_runner, dask_address, cfg.cache_dir)
    run = attack(cfg.attack, model, dataset, cfg.run_dir, cfg.cache_dir, experiment, force)
    return report_flow(cfg.report, run, force=force)
