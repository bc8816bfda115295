"""How much of a pipeline run is orchestration rather than compute.

    python -m benchmarks.overhead [eightgen run options]      e.g. --preset quick --mnist-dir ../shared/datasets/mnist

Runs the pipeline once on cold caches (a temporary cache dir and runs root unless --cache-dir is given),
after the Prefect API is up (server start-up is not counted), then reads its task runs back from the API:
orchestration = flow-run wall time - time inside task runs. Also times a no-op task, Prefect's cost per task.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from eightgen.errors import EightgenError
from runtime.environment import process_env


def _noop_task_cost(n: int = 50) -> float:
    """Seconds one call of a no-op task takes inside a flow (task-run creation, states, records), mean of n."""
    from prefect import flow, task

    from prefect_api.records import wait_for_records

    @task(name="noop")
    def noop() -> None:
        """Nothing: measures the orchestration around a task."""

    @flow(name="overhead-probe")
    def probe(calls: int) -> float:
        """Call the no-op task `calls` times in sequence; return the mean seconds per call."""
        started = time.perf_counter()
        for _ in range(calls):
            noop()
        return (time.perf_counter() - started) / calls

    probe(3)  # warm up
    state = probe(n, return_state=True)
    wait_for_records(state.state_details.flow_run_id)  # exit only once the API has every record
    return state.result()


def measure(argv: Sequence[str]) -> dict:
    """Run the pipeline with `eightgen run` options and return the timing split."""
    from cli.main import build_config, parser

    args = parser().parse_args(["run", *argv])
    cfg = build_config(args)
    tmp = tempfile.TemporaryDirectory(prefix="eightgen-overhead-")
    if args.cache_dir is None:
        cfg = cfg.model_copy(update={"cache_dir": Path(tmp.name) / "cache", "runs_root": Path(tmp.name) / "runs"})
    process_env(cfg.cache_dir)
    from runtime.preflight import preflight

    preflight(cfg)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.pipeline import pipeline
    from prefect_api.records import flow_tree, wait_for_records

    with get_client(sync_client=True) as client:
        client.api_healthcheck()  # starts the ephemeral API if there is no server: not part of the run
    started = time.perf_counter()
    state = pipeline(cfg, force=args.force, return_state=True)
    wall = time.perf_counter() - started
    root = state.state_details.flow_run_id
    wait_for_records(root)
    if not state.is_completed():
        raise EightgenError(f"pipeline ended {state.name}: {state.message}")
    with get_client(sync_client=True) as client:
        tree = flow_tree(client, root)
        subflow_parents = {f.parent_task_run_id for f in (client.read_flow_run(i) for i in tree[1:])}
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=tree)))
        flow_run = client.read_flow_run(root)
    per_name: dict[str, float] = {}
    for r in runs:
        if r.id in subflow_parents or not (r.start_time and r.end_time):
            continue  # the stand-in task run of a subflow spans the whole subflow
        name = r.name.rsplit("-", 1)[0]
        per_name[name] = per_name.get(name, 0.0) + (r.end_time - r.start_time).total_seconds()
    inside = sum(per_name.values())
    api_wall = (flow_run.end_time - flow_run.start_time).total_seconds() if flow_run.end_time and flow_run.start_time else wall
    result = {
        "preset": args.preset,
        "wall_s": wall,
        "flow_run_s": api_wall,
        "tasks_s": inside,
        "task_runs": len(runs) - len(subflow_parents),
        "per_task_s": per_name,
        "orchestration_s": wall - inside,
        "share": (wall - inside) / wall,
        "noop_task_s": _noop_task_cost(),
    }
    tmp.cleanup()
    return result


def summary(m: dict) -> str:
    """The timing split of one run as the lines the command prints."""
    lines = [
        f"pipeline ({m['preset']} preset, cold cache)",
        f"  wall time of the flow call   {m['wall_s']:8.2f} s   (API's own start-to-end: {m['flow_run_s']:.2f} s)",
        f"  inside {m['task_runs']:3d} task runs         {m['tasks_s']:8.2f} s",
    ]
    lines += [f"    {name:26s} {seconds:8.2f} s" for name, seconds in sorted(m["per_task_s"].items(), key=lambda kv: -kv[1])]
    lines += [
        f"  orchestration                {m['orchestration_s']:8.2f} s = {100 * m['share']:.1f} % of wall time (target < 10 %)",
        f"  cost of one no-op task       {1000 * m['noop_task_s']:8.1f} ms",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the timing split of one pipeline run."""
    try:
        m = measure(sys.argv[1:] if argv is None else argv)
    except EightgenError as exc:
        print(f"eightgen: error: {exc}", file=sys.stderr)
        return 2
    print(summary(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
