"""The diffusion experiment as a Prefect flow: the aligned experiment (detectors, referees, gradient runs), a denoiser,
guided sampling in chunks on the same starts, and the "three ways" report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from eightgen.config import DiffusionConfig
from eightgen.store import shown
from flows.aligned import aligned_flow
from flows.stages import assemble_flow, cancellable
from prefect_api.subflows import nested_stages
from runtime.httpd import report_link
from tasks.denoise import gradient_runs, n_sample_chunks, sample_chunk, train_denoiser_model
from tasks.index import refresh_runs_index
from tasks.sanity import n_sanity_chunks, sample_noise_chunk
from tasks.report import artifact_key
from tasks.threeways import DIFFUSION_HTML, judge_three_ways


# One chunk at a time: each chunk already uses every core through torch.
@flow(name="diffusion", task_runner=ThreadPoolTaskRunner(max_workers=1))
@cancellable
def diffusion_flow(cfg: DiffusionConfig = DiffusionConfig(), force: bool = False, overwrite: bool = False) -> Path:
    """Three ways to the target from identical starts: standard gradient, robust gradient, guided diffusion."""
    a = cfg.aligned
    # The denoiser first: the longest stage, and independent of the aligned experiment, which a concurrent
    # `eightgen aligned` of the same settings can be computing meanwhile into the same cache.
    with nested_stages():
        denoiser_data = assemble_flow(cfg.denoiser_dataset, a.cache_dir)
    denoiser = train_denoiser_model(cfg.denoiser, denoiser_data, a.cache_dir, force)
    with nested_stages():
        aligned_flow(a, force=force, overwrite=overwrite)
    found = gradient_runs(a)
    attack = a.attack_at(a.matched_budget)
    detectors = {name: found[f"model-{name}"] for name in a.detectors}
    samples = {}
    for guidance in cfg.guidance:
        scale = cfg.guidance_scale if guidance != "none" else 0.0  # unguided samples never depend on the scale
        futures = [
            sample_chunk.submit(
                attack, guidance, scale, cfg.ddim_steps, cfg.start_level, cfg.record_every, cfg.chunk_size, i,
                denoiser, detectors, found["dataset"], cfg.device, a.cache_dir, force,
            )
            for i in range(n_sample_chunks(attack, cfg.chunk_size))
        ]
        samples[guidance] = [f.result() for f in futures]
    sanity = []
    if "none" in cfg.guidance and a.attack.include_noise:
        seeds = cfg.unguided_seeds
        futures = [
            sample_noise_chunk.submit(seeds, cfg.ddim_steps, cfg.chunk_size, i, denoiser, detectors["robust"], cfg.device, a.cache_dir, force)
            for i in range(n_sanity_chunks(seeds, cfg.chunk_size))
        ]
        sanity = [f.result() for f in futures]
    runs = {name: found[name] for name in a.detectors} | {"referees": found["referees"], "dataset": found["dataset"]}
    report = judge_three_ways(cfg, runs, samples, denoiser, sanity, cfg.run_dir, force)
    html = report.path / DIFFUSION_HTML
    create_markdown_artifact(
        f"## {cfg.run_label}\n\nthree ways report: `{shown(html)}`\n",
        key=f"diffusion-{artifact_key(report.path)}",
        description="eightgen diffusion experiment: where its report is",
    )
    link = report_link(report.path, DIFFUSION_HTML)
    if link:
        create_link_artifact(link, link_text=DIFFUSION_HTML, description="the three ways report")
    refresh_runs_index(a.runs_root)
    return html
