"""Stage task of the aligned experiment: aligned.html and aligned.json from the judged run directories."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from eightgen.artifacts import Artifact, artifact_of, check_unchanged, write_manifest
from eightgen.config import AlignedConfig
from eightgen.store import is_url, local, publish
from reports.aligned import load_aligned_run, render_aligned
from reports.files import ALIGNED_HTML, ALIGNED_JSON, ALIGNED_MANIFEST
from tasks.caching import STAGE_KEY, CachedStage

ALIGNED_REPORT = CachedStage(None, manifest=ALIGNED_MANIFEST)


@task(name="render-aligned", **ALIGNED_REPORT.options)
def render_aligned_report(cfg: AlignedConfig, runs: list[Artifact], run_dir: Path, force: bool = False) -> Artifact:
    """Write aligned.html and aligned.json (per budget and detector, the targets) from the judged run directories."""
    _, key = ALIGNED_REPORT.here()
    loaded = [load_aligned_run(r.path) for r in runs]
    for artifact, run in zip(runs, loaded):
        check_unchanged(artifact, run.run.sha256)
    here = local(run_dir)  # a store's: written in this host's copy, then published (the manifest last)
    render_aligned(loaded, here, matched_budget=cfg.matched_budget, title=cfg.report.title, grid_seeds=cfg.grid_seeds)
    write_manifest(here, {"kind": "aligned-report", STAGE_KEY: key}, [ALIGNED_HTML, ALIGNED_JSON], name=ALIGNED_MANIFEST)
    if is_url(run_dir):
        publish(here, run_dir, [ALIGNED_HTML, ALIGNED_JSON, ALIGNED_MANIFEST])
    return artifact_of(run_dir, name=ALIGNED_MANIFEST)
