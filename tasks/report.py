"""Stage tasks: run directory -> self-contained report.html, and the run's key numbers published to Prefect.

Heavy imports (the HTML renderer and matplotlib) load inside the task body, so a cached run never pays for them.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from eightgen.artifacts import Artifact, check_unchanged
from eightgen.config import ReportConfig
from eightgen.rundir import REPORT, REPORT_MANIFEST, write_report
from eightgen.store import location, shown
from reports.runs import Run, load_run
from reports.summary import digit_table, summary_markdown
from tasks.caching import STAGE_KEY, CachedStage
from tasks.faults import hold
from tasks.progress import meter

RENDER = CachedStage(None, manifest=REPORT_MANIFEST)


def loaded(run: Artifact) -> Run:
    """The run directory read once, verified against its manifest and against the hash it was handed over with."""
    loaded_run = load_run(run.path)
    check_unchanged(run, loaded_run.sha256)
    return loaded_run


@task(name="render-report", **RENDER.options)
def render_run_report(cfg: ReportConfig, run: Artifact, run_dir: Path, force: bool = False) -> Artifact:
    """Render report.html from the verified run directory alone (never retrains or re-optimises)."""
    from reports.render import run_html  # loads matplotlib

    _, key = RENDER.here()
    log = get_run_logger().info
    started = time.perf_counter()
    with meter("report", log, unit="parts") as shown:
        html = run_html(loaded(run), cfg, progress=shown.update)
    log(f"report.html rendered in {time.perf_counter() - started:.1f} s")
    hold()
    return write_report(run_dir, html, {"run_sha256": run.sha256, STAGE_KEY: key})


def artifact_key(run_dir: Path) -> str:
    """A Prefect artifact key for a run directory (lowercase letters, digits and dashes)."""
    return "".join(c if c.isalnum() else "-" for c in location(run_dir).name.lower()).strip("-")[:60] or "run"


@task(name="publish-summary")
def publish_summary(run: Artifact, report_url: str | None = None) -> None:
    """Publish the key numbers, the per-digit table and the report link as Prefect artifacts of the calling flow run."""
    summary, run_dir = loaded(run), run.path
    key = artifact_key(run_dir)
    create_markdown_artifact(
        summary_markdown(summary) + f"\nreport: `{shown(run_dir / REPORT)}`\n",
        key=f"summary-{key}",
        description=f"eightgen run {run_dir.name}: the key numbers",
    )
    create_table_artifact(digit_table(summary), key=f"digits-{key}", description=f"eightgen run {run_dir.name}: results per start digit")
    if report_url:
        create_link_artifact(
            report_url, link_text="report.html", key=f"report-{key}", description=f"eightgen run {run_dir.name}: the HTML report"
        )
