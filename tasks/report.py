"""Stage task: run directory -> self-contained report.html, plus summaries published to Prefect."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from eightgen.artifacts import Artifact, artifact_of, verified, write_manifest
from eightgen.config import ReportConfig
from reports.render import digit_table, render_report, summary_markdown
from tasks.caching import CachedStage

REPORT_MANIFEST = "report.manifest.json"
REPORT = CachedStage(None, (), manifest=REPORT_MANIFEST)


@task(name="render-report", **REPORT.options)
def render_run_report(cfg: ReportConfig, run: Artifact, run_dir: Path, force: bool = False) -> Artifact:
    """Render report.html from the run directory alone (never retrains or re-optimises)."""
    path = render_report([verified(run)], report=cfg)
    write_manifest(run_dir, {"report": path.name}, [path.name], name=REPORT_MANIFEST)
    return artifact_of(run_dir, name=REPORT_MANIFEST)


@task(name="publish-summary")
def publish_summary(run: Artifact, report_url: str | None = None) -> None:
    """Publish the key numbers and the per-digit table as Prefect artifacts of this flow run."""
    key = "".join(c if c.isalnum() else "-" for c in run.path.name.lower()).strip("-")[:60] or "run"
    create_markdown_artifact(summary_markdown(run.path), key=f"summary-{key}", description="eightgen run summary")
    create_table_artifact(digit_table(run.path), key=f"digits-{key}", description="results per start digit")
    if report_url:
        create_link_artifact(report_url, link_text="report.html", key=f"report-{key}")
