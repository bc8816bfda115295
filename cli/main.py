"""The `eightgen` command: run the pipeline, re-render reports, serve deployments."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from cli.aligned import add_aligned_options, aligned_command
from cli.options import build_config, experiment_options
from cli.serve import add_serve_options, serve_command
from eightgen.errors import EightgenError
from prefect_api.server import check_api
from runtime.environment import process_env
from runtime.phases import mark
from runtime.runners import absolute_paths, probe_dask


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    top = argparse.ArgumentParser(prog="eightgen", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="assemble -> train -> optimise -> results -> report, as a Prefect flow run")
    experiment_options(run)

    srv = sub.add_parser("serve", help="serve the pipeline (nightly and on demand) and each stage as Prefect deployments")
    experiment_options(srv)
    add_serve_options(srv)

    rep = sub.add_parser("report", help="re-render report.html from run directories (several: a comparison)")
    rep.add_argument("run_dirs", nargs="+", type=Path)
    rep.add_argument("-o", "--out", type=Path, help="output file (default: RUN_DIR/report.html, or compare.html)")

    aligned = sub.add_parser("aligned", help="standard vs robust detector over L2 budgets, judged by referees: aligned.html")
    add_aligned_options(aligned)
    return top


def _one_line(exc: ValidationError) -> str:
    """A pydantic validation error as one line naming each bad field."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


def run_command(args: argparse.Namespace) -> int:
    """Validate everything cheap first, then run the pipeline flow and wait for its records."""
    mark("imported")
    cfg = build_config(args)
    kind = args.task_runner or ("dask" if args.dask_address else "threads")
    if kind == "dask":
        cfg = absolute_paths(cfg)  # workers may run elsewhere: every path they get must be absolute
    process_env(cfg.cache_dir)
    if args.dask_address:
        probe_dask(args.dask_address)
    check_api(required=False)
    from runtime.embedded import EmbeddedServer

    server = EmbeddedServer()  # boots while the data is checked and the flows are imported
    try:
        from runtime.preflight import preflight

        preflight(cfg, args.overwrite)
        mark("checked")
        from flows.pipeline import pipeline
        from prefect_api.records import flush_workers, wait_for_records

        mark("flows imported")
        with server.wait():
            mark("server up")
            state = pipeline(
                cfg, force=args.force, task_runner=kind, dask_address=args.dask_address, overwrite=args.overwrite, return_state=True
            )
            mark("flow done")
            if server.process is not None:  # its database goes with it: wait until it has every record
                wait_for_records(state.state_details.flow_run_id)
            else:  # a running server records what it was sent after this process is gone
                flush_workers()
            mark("recorded")
    finally:
        server.stop()
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        raise EightgenError(str(exc) if isinstance(exc, BaseException) else f"pipeline ended {state.name}")
    report = state.result()
    print(f"report: {Path(report).resolve()}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Re-render reports from run directories only."""
    from reports.render import render_report

    path = render_report(list(args.run_dirs), out=args.out)
    print(f"report: {path.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eightgen` command."""
    # fastai's import-time torch.jit.script call and pandas-option use warn on every run; they are not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The 'mode\.chained_assignment' option is deprecated")
    args = parser().parse_args(argv)
    commands = {"run": run_command, "report": report_command, "serve": serve_command, "aligned": aligned_command}
    try:
        return commands[args.command](args)
    except ValidationError as exc:
        print(f"eightgen: error: {_one_line(exc)}", file=sys.stderr)
    except EightgenError as exc:
        print(f"eightgen: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("eightgen: interrupted", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
