"""The `eightgen` command: run the pipeline, re-render reports, serve deployments."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from cli.aligned import add_aligned_options, aligned_command
from cli.diffusion import add_diffusion_options, diffusion_command
from cli.lifecycle import run_flow
from cli.options import build_config, experiment_options
from cli.runs import add_runs_options, runs_command
from cli.serve import add_serve_options, serve_command
from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import is_url, local, location, shown
from runtime.environment import process_env
from runtime.errorlog import ErrorLog, describe
from runtime.locks import use_lock_url
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
    rep.add_argument("run_dirs", nargs="+", type=location, help="run directories: paths, or store URLs (s3://bucket/runs/NAME)")
    rep.add_argument("-o", "--out", type=Path, help="output file (default: RUN_DIR/report.html, or compare.html)")

    aligned = sub.add_parser("aligned", help="standard vs robust detector over L2 budgets, judged by referees: aligned.html")
    add_aligned_options(aligned)

    diffusion = sub.add_parser("diffusion", help="three ways to the target: standard gradient, robust gradient, guided diffusion: diffusion.html")
    add_diffusion_options(diffusion)

    runs = sub.add_parser("runs", help="one line per run and experiment in a runs folder, newest first, with its headline share")
    add_runs_options(runs)
    return top


def _one_line(exc: ValidationError) -> str:
    """A pydantic validation error as one line naming each bad field."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")  # a validator's own message says what is wrong
        parts.append(f"{where}: {message}" if where else message)
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

    def prepare() -> None:
        from runtime.preflight import preflight

        for line in preflight(cfg, args.overwrite):
            print(f"eightgen: warning: {line}", file=sys.stderr, flush=True)
        mark("checked")
        import flows.pipeline  # noqa: F401  imported while the server boots

        mark("flows imported")

    def start():
        from flows.pipeline import pipeline

        mark("server up")
        state = pipeline(cfg, force=args.force, task_runner=kind, dask_address=args.dask_address, overwrite=args.overwrite, return_state=True)
        mark("flow done")
        return state

    report = run_flow("pipeline", prepare, start, cfg.cache_dir)  # a failure's traceback goes to the error log
    mark("recorded")
    print(f"report: {shown(location(report))}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Re-render reports from run directories only."""
    from reports.render import render_report
    from runtime.preflight import writable_dir

    if args.out is not None:  # before seconds of rendering
        if args.out.is_dir():
            raise EightgenError(f"-o {args.out} is a directory: give a file name for the report")
        writable_dir(args.out.parent, "-o")
    path = render_report(list(args.run_dirs), out=args.out)
    published = args.out is None and len(args.run_dirs) == 1 and is_url(args.run_dirs[0])
    print(f"report: {shown(args.run_dirs[0] / path.name if published else path)}")
    return 0


def error_log(args: argparse.Namespace, argv: Sequence[str]) -> ErrorLog:
    """The command's error log: under its cache dir (`report` and `runs` have none: the temp dir), created only if needed."""
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir is None and args.command not in ("report", "runs"):
        cache_dir = ExperimentConfig.model_fields["cache_dir"].default
    try:
        cwd = os.getcwd()
    except OSError:  # a deleted working directory
        cwd = "?"
    return ErrorLog(local(cache_dir) if cache_dir is not None else None, header=f"eightgen {' '.join(argv)}\ncwd: {cwd}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eightgen` command: 0 on success, 2 with one line on stderr on any failure."""
    # fastai's import-time torch.jit.script call and pandas-option use warn on every run; they are not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The 'mode\.chained_assignment' option is deprecated")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    commands = {"run": run_command, "report": report_command, "serve": serve_command, "aligned": aligned_command, "diffusion": diffusion_command, "runs": runs_command}
    log = error_log(args, argv)
    with log.prefect_tracebacks():
        try:
            use_lock_url(getattr(args, "lock_url", None))
            return commands[args.command](args)
        except ValidationError as exc:
            problem = _one_line(exc)
        except EightgenError as exc:
            problem = str(exc)
        except KeyboardInterrupt:  # before or after a flow: a flow itself is stopped by cli.lifecycle
            print("eightgen: interrupted; finished work is kept: run the same command to continue", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001  anything else (a full disk, a failed task, a bug): one line, the traceback in the log
            log.write_traceback(exc)
            problem = describe(exc)
    print(log.line(problem), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
