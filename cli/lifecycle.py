"""One lifecycle for every command that runs a flow (run, aligned, diffusion): the checks run while the local Prefect
server boots, the flow runs under a stopper (Ctrl-C, SIGTERM or a lost server end it in seconds with one line), its
records are settled, and its result comes back or fails in one line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.stopping import KEPT, Stopper


def run_flow(what: str, prepare: Callable[[], None], start: Callable[[], Any], cache_dir: Path | None = None) -> Any:
    """Start or reuse the local server, run `prepare` (the checks) while it boots, then `start` (the flow, called with
    return_state=True) under a stopper; settle the flow run's records and return its result (EightgenError if it failed).

    With a cache in a store, its result records' block is saved to the API first (runtime/environment.py)."""
    from prefect_api.server import check_api
    from runtime.embedded import EmbeddedServer

    check_api(required=False)
    server = EmbeddedServer()  # boots while the checks run; kept for the next command
    try:
        prepare()
        from prefect import tags

        from prefect_api.records import mark_stopped, outcome, settle

        # Every flow and task run of this command carries the tag, so a stopped command can find and mark them.
        tag = f"command-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with server.wait():
            if cache_dir is not None:
                from runtime.environment import save_records_block

                save_records_block(cache_dir)
            stopper = Stopper(
                mark=lambda reason: mark_stopped(tag, reason),
                release=lambda: server.stop(wait=False),
                health=server.health if server.pid is not None else None,
                lost_line=f"eightgen: error: Prefect's local API server stopped answering (its log: {server.log}); {KEPT}",
            )
            with stopper, tags(tag):
                state = start()
            settle(state.state_details.flow_run_id, server.outlives_command)
    finally:
        server.stop()
    return outcome(state, what)


def check_runs(cfg: Any, overwrite: bool) -> None:
    """Before any work: disk space for every run of the experiment, and no run directory holding other settings."""
    from eightgen.rundir import check_target
    from runtime.preflight import preflight

    runs = [cfg.experiment(detector, budget) for detector in cfg.detectors for budget in cfg.budgets]
    for line in preflight(runs[0], overwrite, runs=runs):
        print(f"eightgen: warning: {line}", file=sys.stderr, flush=True)
    for run in runs:
        check_target(run.run_dir, run, overwrite)


def run_experiment(what: str, cfg: Any, aligned: Any, flow: str, summary_file: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """run_flow for an experiment (`aligned`, `diffusion`): every run of its aligned part checked first, then the flow
    ("module:function", imported while the server boots); its report's path and JSON summary."""
    module, name = flow.split(":")

    def prepare() -> None:
        check_runs(aligned, args.overwrite)
        importlib.import_module(module)

    def start() -> Any:
        return getattr(importlib.import_module(module), name)(cfg, force=args.force, overwrite=args.overwrite, return_state=True)

    from eightgen.store import local, location

    report = location(run_flow(what, prepare, start, aligned.cache_dir))
    return report, json.loads((local(report.parent) / summary_file).read_text())  # a store's: this host wrote its copy


def finish(report: Path, lines: list[str], check: bool, targets_met: bool) -> int:
    """Print an experiment's summary lines and report path; exit status 1 under --check when a target is missed."""
    print("\n".join(lines))
    from eightgen.store import shown

    print(f"report: {shown(report)}")
    return 1 if check and not targets_met else 0
