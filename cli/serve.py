"""`eightgen serve`: register the pipeline (nightly and manual), the stage re-runs, the aligned and the diffusion experiment as
deployments, and run them."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cli.options import build_config
from eightgen.config import DiffusionConfig, ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import is_url
from prefect_api.server import check_api
from runtime.environment import process_env, save_records_block
from runtime.httpd import Pages, ReportServer
from runtime.runners import TaskRunnerKind, absolute_paths, probe_dask

if TYPE_CHECKING:  # prefect is imported only after the CLI has set its environment
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_REPORTS_PORT = 4201
TAGS = ["eightgen"]


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The options `eightgen serve` has on top of the run options (which set the deployments' defaults)."""
    g = p.add_argument_group("serving")
    g.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule of the nightly pipeline deployment (default {DEFAULT_CRON!r})")
    g.add_argument("--timezone", default=DEFAULT_TIMEZONE, help=f"IANA time zone of --cron (default {DEFAULT_TIMEZONE})")
    g.add_argument("--reports-port", type=int, default=DEFAULT_REPORTS_PORT, help=f"port of the report server on 127.0.0.1 (default {DEFAULT_REPORTS_PORT}; 0 = any free port)")
    g.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once (default: no limit)")


def cron_schedule(cron: str, timezone: str) -> Schedule:
    """A validated Prefect cron schedule, or EightgenError naming what is wrong with it."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise EightgenError("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None
    return Cron(cron, timezone=timezone)


def deployments(
    cfg: ExperimentConfig,
    schedule: Schedule,
    task_runner: TaskRunnerKind = "threads",
    dask_address: str | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> list[RunnerDeployment]:
    """Runner deployments: the pipeline on `schedule` and on demand, stage re-runs by run name, the data, the aligned experiment
    and its robustness sweep, the diffusion experiment."""
    from eightgen.config import SWEEP_MAX_TRAIN, AlignedConfig, sweep_of
    from flows.aligned import aligned_flow
    from flows.diffusion import diffusion_flow
    from flows.pipeline import pipeline, rerun_attack, rerun_report, rerun_train
    from flows.stages import assemble_flow

    pipe = {
        "cfg": cfg.model_dump(mode="json"), "force": force, "task_runner": task_runner, "dask_address": dask_address, "overwrite": overwrite
    }
    where = {"run": "", "runs_root": str(cfg.runs_root), "cache_dir": str(cfg.cache_dir)}
    aligned = AlignedConfig(
        dataset=AlignedConfig().dataset.model_copy(update={"source": cfg.dataset.source, "mnist_dir": cfg.dataset.mnist_dir, "local_path": cfg.dataset.local_path}),
        runs_root=cfg.runs_root,
        cache_dir=cfg.cache_dir,
    )
    return [
        pipeline.to_deployment("nightly", schedules=[schedule], parameters=pipe, tags=TAGS),
        pipeline.to_deployment("manual", parameters=pipe, tags=TAGS),
        assemble_flow.to_deployment("manual", parameters={"cfg": cfg.dataset.model_dump(mode="json"), "cache_dir": str(cfg.cache_dir)}, tags=TAGS),
        rerun_train.to_deployment("manual", parameters={**where, "train": cfg.train.model_dump(mode="json")}, tags=TAGS),
        rerun_attack.to_deployment("manual", parameters={**where, "attack": cfg.attack.model_dump(mode="json")}, tags=TAGS),
        rerun_report.to_deployment("manual", parameters={**where, "report": cfg.report.model_dump(mode="json")}, tags=TAGS),
        aligned_flow.to_deployment("manual", parameters={"cfg": aligned.model_dump(mode="json")}, tags=TAGS),
        aligned_flow.to_deployment(
            "sweep",
            parameters={"cfg": sweep_of(aligned.model_copy(update={"dataset": aligned.dataset.model_copy(update={"max_train": SWEEP_MAX_TRAIN})})).model_dump(mode="json")},
            description="How much robustness does it take to draw the target? One detector per training radius (0-3), the same starts and budgets (aligned.html).",
            tags=TAGS,
        ),
        diffusion_flow.to_deployment("manual", parameters={"cfg": three_ways(cfg).model_dump(mode="json")}, tags=TAGS),
    ]


def three_ways(cfg: ExperimentConfig) -> DiffusionConfig:
    """The served diffusion experiment: its defaults, on the served data source, runs folder and cache."""
    base = DiffusionConfig().aligned
    data = base.dataset.model_copy(update={"source": cfg.dataset.source, "mnist_dir": cfg.dataset.mnist_dir, "local_path": cfg.dataset.local_path})
    return DiffusionConfig(aligned=base.model_copy(update={"dataset": data, "runs_root": cfg.runs_root, "cache_dir": cfg.cache_dir}))


RERUNS = ("rerun-attack", "rerun-train", "rerun-report")


def custom_run_links(timeout: float = 120.0) -> dict[str, str]:
    """Flow name -> URL of the UI's "Custom run" form of its eightgen deployment, once `serve` has registered them."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.settings import PREFECT_UI_URL

    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flows = {f.id: f.name for f in client.read_flows()}
            deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=TAGS)))
            links = {flows.get(d.flow_id, "?"): f"{ui}/deployments/deployment/{d.id}/run" for d in deps}
            if set(RERUNS) <= set(links):
                return links
            time.sleep(1.0)
    return {}


def _announce() -> None:
    """Print the Custom-run links of the stage re-runs (pre-filled forms: the newest run, the served settings)."""
    try:
        links = custom_run_links()
    except Exception:  # a link is a convenience: never let it disturb serving
        return
    for name in RERUNS:
        if name in links:
            print(f"eightgen: {name} of the newest run: {links[name]}", flush=True)


def serve_command(args: argparse.Namespace) -> int:
    """Check everything first (settings, schedule, data, Dask, API, port), then register and serve."""
    if not 0 <= args.reports_port <= 65535:
        raise EightgenError(f"--reports-port {args.reports_port}: a port is 0-65535 (0: any free port)")
    if args.limit is not None and args.limit < 1:
        raise EightgenError(f"--limit {args.limit}: at least 1 flow run must be allowed at a time")
    cfg = absolute_paths(build_config(args))
    process_env(cfg.cache_dir)
    schedule = cron_schedule(args.cron, args.timezone)
    kind = args.task_runner or ("dask" if args.dask_address else "threads")
    if args.dask_address:
        probe_dask(args.dask_address)
    url = check_api()
    save_records_block(cfg.cache_dir)
    from reports.index_page import compare_page, refresh_index

    pages = Pages(index=refresh_index, compare=compare_page)
    # binds the port now: a busy one fails before any work; a runs folder in a store is read there (presigned links)
    reports = None if is_url(cfg.runs_root) else ReportServer(cfg.runs_root, args.reports_port, pages=pages)
    try:
        from runtime.preflight import preflight

        for line in preflight(cfg, args.overwrite):
            print(f"eightgen: warning: {line}", file=sys.stderr, flush=True)
        served = deployments(cfg, schedule, kind, args.dask_address, force=args.force, overwrite=args.overwrite)
        if reports is None:
            print(f"eightgen: API {url}; reports in {cfg.runs_root} (each run's report link is presigned)", flush=True)
        else:
            reports.start()
            print(f"eightgen: API {url}; reports of {reports.root} at {reports.url}", flush=True)
        import threading

        from prefect import serve

        threading.Thread(target=_announce, name="eightgen-links", daemon=True).start()
        serve(*served, limit=args.limit)  # until Ctrl-C or SIGTERM; schedules are paused on the way out
    finally:
        if reports is not None:
            reports.stop()
    return 0
