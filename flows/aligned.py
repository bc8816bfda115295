"""The aligned experiment as a Prefect flow: the stage tasks, their caching, one detector per training radius, one set of starts."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from eightgen.config import AlignedConfig
from eightgen.rundir import AlignedRecord
from eightgen.store import shown
from flows.stages import assemble_flow, cancellable, train_flow
from prefect_api.subflows import nested_stages
from runtime.httpd import report_link
from tasks.aligned import ALIGNED_HTML, render_aligned_report
from tasks.attack import n_chunks, optimize_chunk
from tasks.index import refresh_runs_index
from tasks.judge import collect_judged_results
from tasks.referees import train_referee_models
from tasks.report import artifact_key


# One chunk at a time: each chunk already uses every core through torch.
@flow(name="aligned", task_runner=ThreadPoolTaskRunner(max_workers=1))
@cancellable
def aligned_flow(cfg: AlignedConfig = AlignedConfig(), force: bool = False, overwrite: bool = False) -> Path:
    """Target detectors at each training radius (standard vs robust, or a sweep), identical starts and L2 budgets, every
    result judged by independent referees."""
    with nested_stages():
        dataset = assemble_flow(cfg.dataset, cfg.cache_dir)
        models = {name: train_flow(tcfg, dataset, cfg.cache_dir) for name, tcfg in cfg.detectors.items()}
    referees = train_referee_models(cfg.referees, dataset, cfg.cache_dir)
    runs = []
    for name, model in models.items():
        for budget in cfg.budgets:
            run = cfg.experiment(name, budget)
            chunks = [optimize_chunk.submit(run.attack, model, dataset, i, cfg.cache_dir, force) for i in range(n_chunks(run.attack, dataset))]
            aligned = AlignedRecord(experiment=cfg.run_label, detector=name, budget=budget, matched_budget=cfg.matched_budget)
            runs.append(
                collect_judged_results(
                    run, [c.result() for c in chunks], model, dataset, referees, run.run_dir,
                    f"{cfg.run_label}/{run.run_label}", aligned, overwrite, force,
                )
            )
    report = render_aligned_report(cfg, runs, cfg.root_dir, force)
    html = report.path / ALIGNED_HTML
    key = f"aligned-{artifact_key(report.path)}"
    create_markdown_artifact(
        f"## {cfg.run_label}\n\naligned report: `{shown(html)}`\n", key=key, description="eightgen aligned experiment: where its report is"
    )
    link = report_link(report.path, ALIGNED_HTML)
    if link:
        create_link_artifact(link, link_text=ALIGNED_HTML, description="the aligned report")
    refresh_runs_index(cfg.runs_root)
    return html
