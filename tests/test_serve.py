"""`eightgen serve` and `eightgen run` against a real `prefect server start`, all as separate processes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterTags,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings

from eightgen.artifacts import write_manifest
from eightgen.errors import EightgenError
from flows.records import flow_tree
from flows.serve import cron_schedule
from fixtures_report import make_run_dir
from tiny import TINY, shared_cache

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENTS = {
    "eightgen-pipeline/nightly",
    "eightgen-pipeline/manual",
    "assemble/manual",
    "train/manual",
    "attack/manual",
    "report/manual",
}
TINY_CHUNKS = math.ceil((2 + 1) * 2 / 2)  # tiny.TINY: 2 start digits + noise, 2 seeds each, 2 starts per chunk


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a command in its own process group, output to a log file."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process group started by `start`: SIGTERM, wait, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll `check` until it holds; fail with the process log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout} s\n{log.read_text()[-3000:]}")


def base_env(home: Path) -> dict[str, str]:
    """Environment of every process of this module: own Prefect home, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A `prefect server start` on a free port with a throwaway database; yields its API URL."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port, log = free_port(), tmp / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], base_env(tmp / "home"), log)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 90, "prefect server start", proc, log)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        stop(proc)


def client_env(server: str, tmp: Path) -> dict[str, str]:
    """Environment of a process that talks to the module's server."""
    return base_env(tmp / "home") | {"PREFECT_API_URL": server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}


def deployment_stamps() -> dict[str, str]:
    """'flow/deployment' -> last update time, for every eightgen deployment."""
    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["eightgen"])))
        flows = {f.id: f.name for f in client.read_flows()}
    return {f"{flows[d.flow_id]}/{d.name}": str(d.updated) for d in deps}


@pytest.fixture(scope="module")
def served(server: str, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`eightgen serve` with tiny defaults, a runs folder holding one finished run, and its report port."""
    tmp = tmp_path_factory.mktemp("serve")
    runs = tmp / "runs"
    run_dir = make_run_dir(runs, "fixture-run", seeds=2, digits=(1, 3), steps=10)
    run = write_manifest(run_dir, {"run_name": run_dir.name}, ["results.parquet", "results.csv", "trajectories.npz", "config.json"])
    port, log = free_port(), tmp / "serve.log"
    cmd = [str(BIN / "eightgen"), "serve", *TINY, "--mnist-dir", str(mnist_dir), "--runs-root", str(runs), "--cache-dir", str(tmp / "cache")]
    cmd += ["--cron", "30 2 * * *", "--timezone", "Europe/Berlin", "--reports-port", str(port)]
    proc = start(cmd, client_env(server, tmp), log)
    try:
        wait_for(lambda: set(deployment_stamps()) >= DEPLOYMENTS, 90, "eightgen serve", proc, log)
        yield {"run": run, "port": port, "proc": proc, "log": log, "tmp": tmp}
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_serve_registers_nightly_manual_and_stage_deployments(served: dict) -> None:
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        deps = {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}
    assert set(deps) == DEPLOYMENTS
    nightly, manual = deps["eightgen-pipeline/nightly"], deps["eightgen-pipeline/manual"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [("30 2 * * *", "Europe/Berlin", True)]
    assert manual.schedules == []
    # defaults of the pipeline deployments come from --preset + the run options
    for dep in (nightly, manual):
        cfg = dep.parameters["cfg"]
        assert (cfg["attack"]["seeds"], cfg["attack"]["start_digits"], cfg["attack"]["steps"]) == (2, [1, 3], 5)
        assert (cfg["train"]["epochs"], cfg["dataset"]["max_train"]) == (1, 2000)
        assert Path(cfg["cache_dir"]).is_absolute() and dep.parameters["task_runner"] == "threads"
    # the stage deployments' forms: pydantic configs and upstream artifacts as editable fields
    def fields(dep, param: str) -> set[str]:
        schema = dep.parameter_openapi_schema
        ref = schema["properties"][param]
        ref = ref.get("$ref") or ref.get("allOf", [{}])[0].get("$ref") or ref["anyOf"][0]["$ref"]
        return set(schema["definitions"][ref.rsplit("/", 1)[1]]["properties"])

    assert {"source", "mnist_dir", "pool_per_digit", "max_train"} <= fields(deps["assemble/manual"], "cfg")
    assert {"arch", "epochs", "lr"} <= fields(deps["train/manual"], "cfg")
    assert {"path", "sha256"} <= fields(deps["train/manual"], "dataset")
    assert {"method", "steps", "seeds", "start_digits"} <= fields(deps["attack/manual"], "cfg")
    assert {"path", "sha256"} <= fields(deps["attack/manual"], "model")
    assert {"path", "sha256"} <= fields(deps["report/manual"], "run")
    assert deps["assemble/manual"].parameters["cfg"]["max_train"] == 2000


def test_report_stage_deployment_publishes_artifacts_and_an_http_report_link(served: dict) -> None:
    run = served["run"]
    flow_run = run_deployment(
        "report/manual", parameters={"run": {"path": str(run.path), "sha256": run.sha256}}, timeout=120, poll_interval=1
    )
    assert flow_run.state.is_completed(), (flow_run.state, served["log"].read_text()[-3000:])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    by_key = {a.key.split("-", 1)[0]: a for a in artifacts if a.key}
    assert set(by_key) == {"summary", "digits", "report"}, [(a.key, a.type) for a in artifacts]
    table = by_key["digits"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and len(rows) >= 3  # noise, digit 1, digit 3 (and possibly a total row)
    assert by_key["summary"].type == "markdown" and "%" in by_key["summary"].data
    # the UI renders link artifacts as markdown and drops file:// targets: the report comes over http
    link = re.fullmatch(r"\[report\.html\]\((http://[^)]+)\)", by_key["report"].data).group(1)
    assert link == f"http://127.0.0.1:{served['port']}/{run.path.name}/report.html"
    with urllib.request.urlopen(link, timeout=10) as answer:
        assert answer.status == 200
        assert answer.read() == (run.path / "report.html").read_bytes()


def _task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> state names over a flow-run tree, read from the API (subflow stand-ins left out)."""
    with get_client(sync_client=True) as client:
        tree = flow_tree(client, flow_run_id)
        stand_ins = {client.read_flow_run(i).parent_task_run_id for i in tree[1:]}
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=tree)))
    states: dict[str, list[str]] = {}
    for r in runs:
        if r.id not in stand_ins:
            states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name if r.state else "none")
    return states


def test_cli_runs_print_no_traceback_and_keep_every_record(server: str, mnist_dir: Path, tmp_path: Path, tmp_path_factory) -> None:
    where = ["--mnist-dir", str(mnist_dir), "--runs-root", str(tmp_path / "runs"), "--cache-dir", str(shared_cache(tmp_path_factory))]
    cmd = [str(BIN / "eightgen"), "run", *TINY, *where]
    # against the server first, then with the embedded (ephemeral) API, which finds every stage cached
    on_server = subprocess.run(cmd, cwd=ROOT, env=client_env(server, tmp_path), capture_output=True, text=True, timeout=300)
    ephemeral_home = tmp_path / "ephemeral-home"
    embedded = subprocess.run(cmd, cwd=ROOT, env=base_env(ephemeral_home), capture_output=True, text=True, timeout=300)
    for done in (on_server, embedded):
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "Traceback" not in output and "CancelledError" not in output, output[-3000:]
        assert re.search(r"^report: .*report\.html$", done.stdout, re.M)
    expected = {"fingerprint-source": 1, "assemble-dataset": 1, "train-classifier": 1, "optimize-chunk": TINY_CHUNKS}
    expected |= {"collect-results": 1, "render-report": 1, "publish-summary": 1}
    # the server run, counted through the API after the CLI exited
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["eightgen-pipeline"])))
    (root,) = [r for r in runs if r.deployment_id is None]  # the others: the nightly deployment's scheduled runs
    states = _task_states(root.id)
    assert {k: len(v) for k, v in states.items()} == expected, states
    assert all(s in ("Completed", "Cached") for v in states.values() for s in v), states
    # the embedded run: its API is gone with the process, its database holds every task run, final
    with sqlite3.connect(ephemeral_home / "prefect.db") as db:
        rows = db.execute(
            "SELECT name, state_name FROM task_run WHERE id NOT IN "
            "(SELECT parent_task_run_id FROM flow_run WHERE parent_task_run_id IS NOT NULL)"
        ).fetchall()
    counts: dict[str, int] = {}
    for name, _ in rows:
        counts[name.rsplit("-", 1)[0]] = counts.get(name.rsplit("-", 1)[0], 0) + 1
    assert counts == expected, rows
    assert {state for _, state in rows} <= {"Completed", "Cached"}, rows
    assert {state for name, state in rows if name.startswith(("train-classifier", "optimize-chunk"))} == {"Cached"}, rows


def test_prefect_yaml_deploys_the_same_flows_to_a_work_pool() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    found = set()
    for dep in spec["deployments"]:
        path, name = dep["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
        found.add(f"{flow.name}/{dep['name']}")
        if dep.get("parameters"):
            flow.validate_parameters(dep["parameters"])
        for s in dep.get("schedules") or []:
            cron_schedule(s["cron"], s["timezone"])
        assert dep["work_pool"]["name"] == "eightgen"
        assert Path(dep["work_pool"]["job_variables"]["env"]["PREFECT_LOCAL_STORAGE_PATH"].replace("{{ $PWD }}", "/x")).is_absolute()
    assert found == DEPLOYMENTS


def test_cron_schedule_names_what_is_wrong() -> None:
    assert cron_schedule("30 2 * * 1-5", "Europe/Berlin").timezone == "Europe/Berlin"
    with pytest.raises(EightgenError, match=r"^Invalid cron string: \"0 3 \* \*\"$"):
        cron_schedule("0 3 * *", "UTC")
    with pytest.raises(EightgenError, match="Invalid timezone: \"Mars/Olympus\""):
        cron_schedule("0 3 * * *", "Mars/Olympus")


def test_bad_input_fails_in_one_line_and_registers_nothing(served: dict, server: str, mnist_dir: Path) -> None:
    tmp = served["tmp"]
    before = deployment_stamps()
    base = [str(BIN / "eightgen"), "serve", *TINY, "--mnist-dir", str(mnist_dir), "--runs-root", str(tmp / "runs2")]
    base += ["--reports-port", str(free_port())]
    nowhere = f"http://127.0.0.1:{free_port()}/api"
    cases = {
        "bad cron": (base + ["--cron", "61 * * * *"], client_env(server, tmp), "Invalid cron string"),
        "no server": (base, client_env(server, tmp) | {"PREFECT_API_URL": nowhere}, f"no Prefect API reachable at {nowhere}"),
        "busy port": (base[:-1] + [str(served["port"])], client_env(server, tmp), f"cannot serve reports on 127.0.0.1:{served['port']}"),
        "run, no server": (
            [str(BIN / "eightgen"), "run", *TINY, "--mnist-dir", str(mnist_dir), "--runs-root", str(tmp / "runs2")],
            client_env(server, tmp) | {"PREFECT_API_URL": nowhere},
            f"no Prefect API reachable at {nowhere}",
        ),
    }
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, (cmd, env, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, out, err)
        assert len(lines) == 1 and lines[0].startswith("eightgen: error: "), (name, err)
        assert cases[name][2] in lines[0], (name, lines[0])
    assert deployment_stamps() == before
