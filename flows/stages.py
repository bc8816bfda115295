"""The four stage flows; each is also its own deployment, re-runnable from the UI with edited parameters."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from eightgen.artifacts import Artifact
from eightgen.config import AttackConfig, DatasetConfig, ReportConfig, TrainConfig
from flows.httpd import report_link
from tasks.assemble import assemble_dataset, fingerprint_source
from tasks.attack import collect_results, n_chunks, optimize_chunk
from tasks.report import publish_summary, render_run_report
from tasks.train import train_classifier

DEFAULT_CACHE = Path(".eightgen-cache")


@flow(name="assemble", log_prints=False)
def assemble_flow(cfg: DatasetConfig = DatasetConfig(), cache_dir: Path = DEFAULT_CACHE, force: bool = False) -> Artifact:
    """MNIST source -> 8-vs-not-8 dataset artifact (train / valid / attack-start pool)."""
    return assemble_dataset(cfg, fingerprint_source(cfg), cache_dir, force)


@flow(name="train")
def train_flow(
    cfg: TrainConfig, dataset: Artifact, cache_dir: Path = DEFAULT_CACHE, force: bool = False
) -> Artifact:
    """Dataset artifact -> fastai-trained 8-detector artifact."""
    return train_classifier(cfg, dataset, cache_dir, force)


# One chunk at a time per process: each chunk already uses every core through torch.
@flow(name="attack", task_runner=ThreadPoolTaskRunner(max_workers=1))
def attack_flow(
    cfg: AttackConfig,
    model: Artifact,
    dataset: Artifact,
    run_dir: Path,
    cache_dir: Path = DEFAULT_CACHE,
    experiment: dict | None = None,
    force: bool = False,
) -> Artifact:
    """Model + dataset -> optimised chunks of starts -> results and trajectories in the run directory."""
    chunks = [optimize_chunk.submit(cfg, model, dataset, i, cache_dir, force) for i in range(n_chunks(cfg))]
    return collect_results(cfg, [c.result() for c in chunks], model, dataset, run_dir, experiment or {}, force)


@flow(name="report")
def report_flow(cfg: ReportConfig, run: Artifact, report_url: str | None = None, force: bool = False) -> Path:
    """Run directory -> report.html, with the key numbers published as Prefect artifacts."""
    rendered = render_run_report(cfg, run, run.path, force)
    publish_summary(run, report_url or report_link(run.path))
    return rendered.path / "report.html"
