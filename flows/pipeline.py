"""The parent flow, and the stage re-runs: they only put the stage flows in order."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from eightgen.artifacts import Artifact, verified
from eightgen.config import PRESETS, AttackConfig, ExperimentConfig, ReportConfig, TrainConfig
from eightgen.rundir import REPORT, find_run, load_record
from eightgen.store import Location
from flows.stages import DEFAULT_CACHE, assemble_flow, cancellable, attack_flow_on, report_flow, train_flow
from prefect_api.subflows import nested_stages
from runtime.httpd import report_link
from runtime.runners import TaskRunnerKind
from tasks.index import refresh_runs_index
from tasks.report import publish_summary

RUNS_ROOT = Path("runs")


def attack_and_report(
    cfg: ExperimentConfig,
    model: Artifact,
    dataset: Artifact,
    overwrite: bool = False,
    force: bool = False,
    task_runner: TaskRunnerKind = "threads",
    dask_address: str | None = None,
) -> Path:
    """The attack and report stages, then the summary and report link on the calling flow run's Artifacts tab."""
    attack = attack_flow_on(task_runner, dask_address, cfg.cache_dir)
    with nested_stages():
        run = attack(cfg, model, dataset, overwrite, force)
        report_flow(cfg.report, run, force)
    publish_summary(run, report_link(run.path))
    refresh_runs_index(cfg.runs_root)
    return run.path / REPORT


@flow(name="eightgen-pipeline")
@cancellable
def pipeline(
    cfg: ExperimentConfig = PRESETS["quick"],
    force: bool = False,
    task_runner: TaskRunnerKind = "threads",
    dask_address: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Dataset -> target detector -> pixel optimisation -> results -> HTML report."""
    with nested_stages():
        dataset = assemble_flow(cfg.dataset, cfg.cache_dir)
        model = train_flow(cfg.train, dataset, cfg.cache_dir)
    return attack_and_report(cfg, model, dataset, overwrite, force, task_runner, dask_address)


def _from_run(run: str, runs_root: Path, cache_dir: Path, **changes: object) -> tuple[ExperimentConfig, Artifact, Artifact]:
    """A source run's settings with `changes`, named from those settings, and its verified model and dataset.

    The model is verified only when the settings keep the detector (a train re-run makes its own).
    """
    record = load_record(find_run(runs_root, run))
    update = {k: v for k, v in changes.items() if v is not None}
    cfg = record.config.model_copy(update={**update, "run_name": None, "runs_root": runs_root, "cache_dir": cache_dir})
    cfg = ExperimentConfig.model_validate(cfg.model_dump())  # validate the combination
    dataset, model = record.dataset.artifact(), record.model.artifact()
    verified(dataset)
    if cfg.train == record.config.train:
        verified(model)
    return cfg, model, dataset


@flow(name="rerun-train")
@cancellable
def rerun_train(
    run: str = "", train: TrainConfig | None = None, runs_root: Location = RUNS_ROOT, cache_dir: Location = DEFAULT_CACHE, force: bool = False
) -> Path:
    """Retrain the detector of an existing run (default: the newest) with these settings, then attack and report."""
    cfg, _, dataset = _from_run(run, runs_root, cache_dir, train=train)
    with nested_stages():
        model = train_flow(cfg.train, dataset, cfg.cache_dir, force)
    return attack_and_report(cfg, model, dataset, force=force)


@flow(name="rerun-attack")
@cancellable
def rerun_attack(
    run: str = "", attack: AttackConfig | None = None, runs_root: Location = RUNS_ROOT, cache_dir: Location = DEFAULT_CACHE, force: bool = False
) -> Path:
    """Optimise again from an existing run's dataset and detector (default: the newest run) with these attack settings."""
    return attack_and_report(*_from_run(run, runs_root, cache_dir, attack=attack), force=force)


@flow(name="rerun-report")
@cancellable
def rerun_report(
    run: str = "", report: ReportConfig | None = None, runs_root: Location = RUNS_ROOT, cache_dir: Location = DEFAULT_CACHE, force: bool = False
) -> Path:
    """Render an existing run's report (default: the newest run) with these report settings."""
    return attack_and_report(*_from_run(run, runs_root, cache_dir, report=report), force=force)
