"""The aligned experiment as a Prefect flow: the stage tasks, their caching, two detectors, one set of starts."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from eightgen.config import AlignedConfig
from flows.stages import assemble_flow, train_flow
from tasks.aligned import collect_judged_results, render_aligned_report
from tasks.attack import n_chunks, optimize_chunk
from tasks.referees import train_referee_models


# One chunk at a time: each chunk already uses every core through torch.
@flow(name="aligned", task_runner=ThreadPoolTaskRunner(max_workers=1))
def aligned_flow(cfg: AlignedConfig = AlignedConfig(), force: bool = False) -> Path:
    """Standard vs robust 8-detector, identical starts and L2 budgets, every result judged by independent referees."""
    dataset = assemble_flow(cfg.dataset, cfg.cache_dir)
    models = {name: train_flow(tcfg, dataset, cfg.cache_dir) for name, tcfg in cfg.detectors.items()}
    referees = train_referee_models(cfg.referees, dataset, cfg.cache_dir)
    runs = []
    for name, model in models.items():
        for budget in cfg.budgets:
            run = cfg.experiment(name, budget)
            chunks = [optimize_chunk.submit(run.attack, model, dataset, i, cfg.cache_dir, force) for i in range(n_chunks(run.attack))]
            experiment = {"run_name": f"{cfg.run_label}/{run.run_label}", "config": run.model_dump(mode="json")}
            aligned = {"experiment": cfg.run_label, "detector": name, "budget": budget, "matched_budget": cfg.matched_budget}
            runs.append(
                collect_judged_results(
                    run.attack, [c.result() for c in chunks], model, dataset, referees, run.run_dir, experiment, aligned, force
                )
            )
    report = render_aligned_report(cfg, runs, cfg.root_dir, force)
    return report.path / "aligned.html"
