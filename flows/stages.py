"""The stage flows the pipeline puts in order: assemble, train, attack, report (artifacts in, artifacts out)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

from prefect import Flow, flow
from prefect.task_runners import ThreadPoolTaskRunner

from eightgen.artifacts import Artifact
from eightgen.config import DatasetConfig, ExperimentConfig, ReportConfig, TrainConfig
from eightgen.errors import EightgenError
from eightgen.store import Location, is_url
from runtime.runners import TASK_RUNNERS, TaskRunnerKind, probe_dask
from runtime.stopping import stopper_for_cancellation, track_chunks
from tasks.assemble import assemble_dataset, fingerprint_source
from tasks.attack import n_chunks, optimize_chunk
from tasks.collect import collect_results
from tasks.report import render_run_report
from tasks.train import train_classifier

DEFAULT_CACHE = Path(".eightgen-cache")
F = TypeVar("F", bound=Callable[..., Any])


def cancellable(fn: F) -> F:
    """A flow function that a cancel from the UI stops at once when a runner started it (a deployment run: the runner's
    SIGTERM ends the process, its staging folders cleared); run any other way, it is the function itself."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from prefect.runtime import deployment

        with stopper_for_cancellation() if deployment.id else nullcontext():
            return fn(*args, **kwargs)

    # Prefect reads the parameters from the signature: the original's, with its annotations resolved in its own module.
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


@flow(name="assemble", log_prints=False)
def assemble_flow(cfg: DatasetConfig = DatasetConfig(), cache_dir: Location = DEFAULT_CACHE, force: bool = False) -> Artifact:
    """Data source -> target-vs-rest dataset artifact (train / valid / attack-start pool)."""
    return assemble_dataset(cfg, fingerprint_source(cfg), cache_dir, force)


@flow(name="train")
def train_flow(cfg: TrainConfig, dataset: Artifact, cache_dir: Location = DEFAULT_CACHE, force: bool = False) -> Artifact:
    """Dataset artifact -> fastai-trained target-detector artifact."""
    return train_classifier(cfg, dataset, cache_dir, force)


# One chunk at a time per process: each chunk already uses every core through torch.
@flow(name="attack", task_runner=ThreadPoolTaskRunner(max_workers=1))
def attack_flow(
    cfg: ExperimentConfig, model: Artifact, dataset: Artifact, overwrite: bool = False, force: bool = False
) -> Artifact:
    """Model + dataset -> optimised chunks of starts -> the run directory named by the settings, written whole."""
    chunks = [optimize_chunk.submit(cfg.attack, model, dataset, i, cfg.cache_dir, force) for i in range(n_chunks(cfg.attack, dataset))]
    track_chunks(chunks)
    return collect_results(cfg, [c.result() for c in chunks], model, dataset, cfg.run_dir, cfg.run_label, overwrite, force)


@flow(name="report")
def report_flow(cfg: ReportConfig, run: Artifact, force: bool = False) -> Artifact:
    """Run directory -> report.html (the report manifest's Artifact)."""
    return render_run_report(cfg, run, run.path, force)


def attack_flow_on(kind: TaskRunnerKind = "threads", dask_address: str | None = None, cache_dir: Location | None = None) -> Flow:
    """The attack stage flow with its chunks on threads (in process) or on Dask workers."""
    if kind == "threads":
        if dask_address:
            raise EightgenError("a Dask address needs the dask task runner")
        return attack_flow
    if kind != "dask":
        raise EightgenError(f"unknown task runner {kind!r}: choose one of {', '.join(TASK_RUNNERS)}")
    if dask_address and cache_dir is not None and not is_url(cache_dir) and not Path(cache_dir).is_absolute():
        raise EightgenError(f"with a Dask cluster the cache dir must be an absolute path every worker reads, got {cache_dir}")
    if dask_address:
        probe_dask(dask_address)
    from runtime.dask_runner import dask_runner

    return attack_flow.with_options(task_runner=dask_runner(dask_address))
