"""Stage tasks: run directory -> self-contained report.html, and the run's key numbers published to Prefect.

Heavy imports (the HTML renderer and matplotlib) load inside the task body, so a cached run never pays for them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from eightgen.artifacts import Artifact, verified
from eightgen.config import ReportConfig
from eightgen.rundir import REPORT_MANIFEST, write_report
from reports.summary import digit_table, summary_markdown
from tasks.caching import STAGE_KEY, CachedStage

REPORT = CachedStage(None, manifest=REPORT_MANIFEST)


@task(name="render-report", **REPORT.options)
def render_run_report(cfg: ReportConfig, run: Artifact, run_dir: Path, force: bool = False) -> Artifact:
    """Render report.html from the verified run directory alone (never retrains or re-optimises)."""
    from reports.render import report_html  # loads matplotlib

    _, key = REPORT.here()
    _, html = report_html([verified(run)], report=cfg)
    return write_report(run_dir, html, {"run_sha256": run.sha256, STAGE_KEY: key})


def artifact_key(run_dir: Path) -> str:
    """A Prefect artifact key for a run directory (lowercase letters, digits and dashes)."""
    return "".join(c if c.isalnum() else "-" for c in Path(run_dir).name.lower()).strip("-")[:60] or "run"


@task(name="publish-summary")
def publish_summary(run: Artifact, report_url: str | None = None) -> None:
    """Publish the key numbers, the per-digit table and the report link as Prefect artifacts of the calling flow run."""
    run_dir = verified(run)
    key = artifact_key(run_dir)
    create_markdown_artifact(
        summary_markdown(run_dir) + f"\nreport: `{(run_dir / 'report.html').resolve()}`\n",
        key=f"summary-{key}",
        description=f"eightgen run {run_dir.name}: the key numbers",
    )
    create_table_artifact(digit_table(run_dir), key=f"digits-{key}", description=f"eightgen run {run_dir.name}: results per start digit")
    if report_url:
        create_link_artifact(
            report_url, link_text="report.html", key=f"report-{key}", description=f"eightgen run {run_dir.name}: the HTML report"
        )
