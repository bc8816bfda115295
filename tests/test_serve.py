"""`eightgen serve` and `eightgen run` against a real `prefect server start`, all as separate processes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import httpx
import pandas as pd
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
)
from prefect.deployments import run_deployment
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from websockets.asyncio.client import connect

from eightgen.artifacts import MANIFEST
from eightgen.errors import EightgenError
from eightgen.rundir import find_run, load_record, verify_run
from prefect_api.records import task_run_states, wait_for_records
from cli.serve import cron_schedule
from fixtures_report import make_run_dir
from test_report_browser import Browser, Session, open_page
from helpers import TINY, embedded_task_states, shared_cache
from tasks.faults import HOLD_CHUNK, HOLD_IN, HOLD_MARKER

pytestmark = pytest.mark.slow  # trains models, starts servers or clusters: the full suite only

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENTS = {
    "eightgen-pipeline/nightly",
    "eightgen-pipeline/manual",
    "assemble/manual",
    "rerun-train/manual",
    "rerun-attack/manual",
    "rerun-report/manual",
    "aligned/manual",
    "aligned/sweep",
    "diffusion/manual",
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
    url = f"http://127.0.0.1:{port}/api"
    # the UI's browser code calls PREFECT_UI_API_URL, which otherwise names the default port 4200
    env = base_env(tmp / "home") | {"PREFECT_UI_API_URL": url}
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)

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
    """`eightgen serve` with tiny defaults over a runs folder holding one synthetic run, with its report port."""
    tmp = tmp_path_factory.mktemp("serve")
    runs, cache = tmp / "runs", shared_cache(tmp_path_factory)
    # a synthetic run (no real model or dataset: never the source of a re-run), older than any run made later
    synthetic = make_run_dir(runs, "fixture-run", seeds=2, digits=(1, 3), steps=10)
    old = time.time() - 3600
    os.utime(synthetic / MANIFEST, (old, old))
    port, log = free_port(), tmp / "serve.log"
    cmd = [str(BIN / "eightgen"), "serve", *TINY, "--mnist-dir", str(mnist_dir), "--runs-root", str(runs), "--cache-dir", str(cache)]
    cmd += ["--cron", "30 2 * * *", "--timezone", "Europe/Berlin", "--reports-port", str(port)]
    # Chunk 2 of an optimisation holds once the marker is deleted (a test arms it); while it exists nothing holds.
    hold = tmp / "held"
    hold.touch()
    proc = start(cmd, client_env(server, tmp) | {HOLD_IN: "optimize-chunk", HOLD_CHUNK: "2", HOLD_MARKER: str(hold)}, log)
    try:
        wait_for(lambda: set(deployment_stamps()) >= DEPLOYMENTS, 90, "eightgen serve", proc, log)
        yield {
            "synthetic": verify_run(synthetic), "runs": runs, "cache": cache, "port": port, "proc": proc, "log": log, "tmp": tmp,
            "hold": hold,
        }
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under a folder."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def real_run(served: dict, server: str, mnist_dir: Path) -> dict:
    """A real tiny run made by `eightgen run` (against the server) into the served runs root: the source of the re-runs."""
    tmp = served["tmp"]
    cmd = [str(BIN / "eightgen"), "run", *TINY, "--mnist-dir", str(mnist_dir)]
    cmd += ["--runs-root", str(served["runs"]), "--cache-dir", str(served["cache"])]
    done = subprocess.run(cmd, cwd=ROOT, env=client_env(server, tmp), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = Path(re.search(r"^report: (.*report\.html)$", done.stdout, re.M).group(1))
    assert report.parent.parent == served["runs"].resolve() and report.parent.name != "fixture-run"
    run_dir = served["runs"] / report.parent.name
    verify_run(run_dir)
    return {"dir": run_dir, "record": load_record(run_dir), "rows": len(pd.read_parquet(run_dir / "results.parquet")), "hashes": tree_hashes(run_dir)}


def deployment(name: str):
    """A deployment read from the API by 'flow/deployment'."""
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_serve_registers_nightly_manual_rerun_and_aligned_deployments(served: dict) -> None:
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

    # the forms: pydantic configs as editable fields
    def fields(dep, param: str) -> set[str]:
        schema = dep.parameter_openapi_schema
        ref = schema["properties"][param]
        ref = ref.get("$ref") or ref.get("allOf", [{}])[0].get("$ref") or ref["anyOf"][0]["$ref"]
        return set(schema["definitions"][ref.rsplit("/", 1)[1]]["properties"])

    assert {"source", "mnist_dir", "pool_per_digit", "max_train"} <= fields(deps["assemble/manual"], "cfg")
    assert deps["assemble/manual"].parameters["cfg"]["max_train"] == 2000
    # the re-runs: a run name (empty = the newest run) and one settings slice, pre-filled with the serve settings
    where = {"run": "", "runs_root": str(served["runs"]), "cache_dir": str(served["cache"])}
    for name, param, wanted in [
        ("rerun-attack/manual", "attack", {"method", "steps", "seeds", "start_digits"}),
        ("rerun-train/manual", "train", {"arch", "epochs", "lr"}),
        ("rerun-report/manual", "report", {"title", "strips_per_digit", "gallery_size"}),
    ]:
        dep = deps[name]
        assert dep.schedules == []
        assert dep.parameter_openapi_schema["properties"]["run"] | {"position": 0} == {
            "default": "", "position": 0, "title": "run", "type": "string"
        }, name
        assert wanted <= fields(dep, param), name
        assert set(dep.parameters) == set(where) | {param}, (name, dep.parameters)
        assert {k: dep.parameters[k] for k in where} == where, (name, dep.parameters)
    attack = deps["rerun-attack/manual"].parameters["attack"]
    assert (attack["steps"], attack["seeds"], attack["start_digits"], attack["chunk_size"]) == (5, 2, [1, 3], 2)
    assert deps["rerun-train/manual"].parameters["train"]["epochs"] == 1
    assert deps["rerun-report/manual"].parameters["report"]["title"] == manual.parameters["cfg"]["report"]["title"]
    assert "cfg" in deps["aligned/manual"].parameter_openapi_schema["properties"]
    assert "cfg" in deps["aligned/manual"].parameters
    sweep = deps["aligned/sweep"].parameters["cfg"]
    assert sweep["radii"] == [0.0, 0.25, 0.5, 1.0, 2.0, 3.0] and sweep["referees"]["robust_eps"] == 4.5
    assert sweep["cache_dir"] == str(served["cache"]) and sweep["runs_root"] == str(served["runs"])
    three = deps["diffusion/manual"].parameters["cfg"]
    assert {"aligned", "denoiser", "guidance_scale", "ddim_steps"} <= fields(deps["diffusion/manual"], "cfg")
    assert three["aligned"]["cache_dir"] == str(served["cache"]) and three["aligned"]["runs_root"] == str(served["runs"])
    # nothing a user would have to type by hand: no hashes, no artifact paths, no required parameter
    for name, dep in deps.items():
        schema = dep.parameter_openapi_schema
        assert "sha256" not in json.dumps(dep.parameters) and "sha256" not in json.dumps(schema), name
        assert "Artifact" not in schema.get("definitions", {}) and not schema.get("required"), name
        assert not {"dataset", "model"} & set(schema["properties"]), name


def _task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> state names over a flow-run tree, once the API has them all."""
    wait_for_records(flow_run_id)  # a deployment's run reports Completed before its last task states arrive
    return task_run_states(flow_run_id)


def _new_run(served: dict, real: dict, before: set[Path]) -> Path:
    """The one run directory a re-run added to the served runs root."""
    after = {p for p in served["runs"].iterdir() if p.is_dir() and not p.name.startswith(".")}
    (new,) = after - before
    assert new.name != real["dir"].name
    verify_run(new)
    return new


def _check_published(flow_run, new: Path, port: int) -> None:
    """The calling (parent) flow run holds summary, digits and an http report link of the new run."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    by_key = {a.key.split("-", 1)[0]: a for a in artifacts if a.key}
    assert set(by_key) == {"summary", "digits", "report"}, [(a.key, a.type) for a in artifacts]
    assert all(a.key.endswith(new.name.lower()) for a in by_key.values()), [a.key for a in artifacts]
    table = by_key["digits"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and [r["group"] for r in rows] == ["noise", "1", "3", "all"], rows
    success = pd.read_parquet(new / "results.parquet")["success"]
    assert by_key["summary"].type == "markdown", by_key["summary"]
    assert f"- **success** {int(success.sum()):,} / {len(success):,} = " in by_key["summary"].data, by_key["summary"].data
    # the UI renders link artifacts as markdown and drops file:// targets: the report comes over http
    link = re.fullmatch(r"\[report\.html\]\((http://[^)]+)\)", by_key["report"].data).group(1)
    assert link == f"http://127.0.0.1:{port}/{new.name}/report.html"
    with urllib.request.urlopen(link, timeout=10) as answer:
        assert answer.status == 200
        assert answer.read() == (new / "report.html").read_bytes()


def test_rerun_attack_from_the_newest_run_with_only_the_attack_form_edited(served: dict, real_run: dict) -> None:
    # the UI's four actions: open rerun-attack/manual, Custom run, change steps in the pre-filled attack form, Submit
    assert find_run(served["runs"]) == real_run["dir"], "the real run must be the newest run of the served runs root"
    attack = deployment("rerun-attack/manual").parameters["attack"] | {"steps": 8}
    before = {p for p in served["runs"].iterdir() if p.is_dir()}
    flow_run = run_deployment("rerun-attack/manual", parameters={"attack": attack}, timeout=600, poll_interval=1)
    assert flow_run.state.is_completed(), (flow_run.state, served["log"].read_text()[-3000:])
    new = _new_run(served, real_run, before)
    results = pd.read_parquet(new / "results.parquet")
    assert len(results) == real_run["rows"] and (results["steps"] == 8).all(), results[["run_id", "steps"]]
    record, source = load_record(new), real_run["record"]
    assert record.config.attack.steps == 8 and record.config.attack == source.config.attack.model_copy(update={"steps": 8})
    assert record.config.run_label == new.name and record.run_name == new.name
    assert (record.dataset.sha256, record.model.sha256) == (source.dataset.sha256, source.model.sha256)
    assert (record.config.train, record.config.dataset) == (source.config.train, source.config.dataset)
    assert new.name in (new / "report.html").read_text(encoding="utf-8")
    assert tree_hashes(real_run["dir"]) == real_run["hashes"]  # the source run is untouched
    _check_published(flow_run, new, served["port"])
    states = _task_states(flow_run.id)
    assert "train-classifier" not in states and "assemble-dataset" not in states, states
    assert states["optimize-chunk"] == ["Completed"] * TINY_CHUNKS, states
    assert states["render-report"] == ["Completed"] and states["publish-summary"] == ["Completed"], states


def test_rerun_report_of_a_named_run_with_a_new_title_reuses_every_chunk(served: dict, real_run: dict) -> None:
    title = "eightgen tiny re-rendered 4711"
    report = deployment("rerun-report/manual").parameters["report"] | {"title": title}
    before = {p for p in served["runs"].iterdir() if p.is_dir()}
    flow_run = run_deployment(
        "rerun-report/manual", parameters={"run": real_run["dir"].name, "report": report}, timeout=600, poll_interval=1
    )
    assert flow_run.state.is_completed(), (flow_run.state, served["log"].read_text()[-3000:])
    new = _new_run(served, real_run, before)
    record = load_record(new)
    assert record.config.report.title == title and record.config.run_label == new.name
    assert record.config.attack == real_run["record"].config.attack
    assert title in (new / "report.html").read_text(encoding="utf-8")
    assert title not in (real_run["dir"] / "report.html").read_text(encoding="utf-8")
    assert tree_hashes(real_run["dir"]) == real_run["hashes"]  # the source run is untouched
    _check_published(flow_run, new, served["port"])
    states = _task_states(flow_run.id)
    assert "train-classifier" not in states, states
    assert states["optimize-chunk"] == ["Cached"] * TINY_CHUNKS, states
    assert states["render-report"] == ["Completed"], states


RERUN_ATTACK_LINK = re.compile(r"^eightgen: rerun-attack of the newest run: (http://\S+)$", re.M)
# the attack form's "Steps" number input: the one input of the schema-form property labelled "Steps"
STEPS_INPUT = """(() => {
  const prop = Array.from(document.querySelectorAll('.schema-form-property')).find(
    p => (p.querySelector('.schema-form-property__label')?.textContent || '').trim().replace(/ \\(Optional\\)$/, '') === 'Steps');
  return prop ? prop.querySelector('input') : null;
})()"""
SUBMIT_BUTTON = "Array.from(document.querySelectorAll('button')).find(b => b.textContent.trim() === 'Submit')"


def _link_from_log(log: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The rerun-attack Custom-run link `eightgen serve` printed."""
    wait_for(lambda: RERUN_ATTACK_LINK.search(log.read_text()) is not None, timeout, "the rerun-attack link in the serve log", proc, log)
    return RERUN_ATTACK_LINK.search(log.read_text()).group(1)


async def _until(page: Session, expression: str, timeout: float, what: str):
    """Poll a page expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await page.evaluate(expression)
        if value:
            return value
        await page.drain(0.3)
    raise AssertionError(f"{what}: not within {timeout} s")


# a count of DOM changes since the first call (nodes added or removed, text changed)
DOM_CHANGES = """(() => {
  if (window.__eightgenChanges === undefined) {
    window.__eightgenChanges = 0;
    new MutationObserver(ms => { window.__eightgenChanges += ms.length; })
      .observe(document, {subtree: true, childList: true, characterData: true});
  }
  return window.__eightgenChanges;
})()"""


def _in_flight(events: list[dict]) -> set[str]:
    """Ids of the page's http requests that have neither finished nor failed."""
    started, done = set(), set()
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Network.requestWillBeSent" and params["request"]["url"].startswith("http"):
            started.add(params["requestId"])
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            done.add(params["requestId"])
    return started - done


async def _settle(page: Session, quiet: float = 1.0, timeout: float = 30) -> None:
    """Wait until the page is quiet, as it looks to a user about to type: no request in flight and
    no request, response or DOM change for `quiet` seconds (the UI loads its data after the form appears)."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        await page.drain(0.2)
        now = (await page.evaluate(DOM_CHANGES), sum(1 for e in page.events if e.get("method", "").startswith("Network.")))
        if now != last or _in_flight(page.events):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"the page did not settle within {timeout} s (requests in flight: {len(_in_flight(page.events))})")


# after Submit: the UI leaves the form for the deployment page and toasts "<run name> scheduled to start now",
# or it stays and toasts "Something went wrong" (e.g. when the server answers 503 while its SQLite database is busy)
SUBMIT_OUTCOME = """(() => {
  const text = document.body.innerText, run = text.match(/(\\S+) scheduled to start now/), error = text.indexOf('Something went wrong');
  return run ? {run: run[1]} : error >= 0 ? {error: text.slice(Math.max(0, error - 40), error + 120)} : null;
})()"""


def _failed_responses(events: list[dict]) -> list[str]:
    """'status METHOD url' of every http response of the page with a status of 400 or more."""
    methods = {e["params"]["requestId"]: e["params"]["request"]["method"] for e in events if e.get("method") == "Network.requestWillBeSent"}
    return [
        f"{e['params']['response']['status']} {methods.get(e['params']['requestId'], '?')} {e['params']['response']['url']}"
        for e in events
        if e.get("method") == "Network.responseReceived" and e["params"]["response"]["status"] >= 400
    ]


async def _click(page: Session, element: str) -> None:
    """A real left click (mouse pressed and released) at the centre of an element, scrolled into view."""
    box = await page.evaluate(
        f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
        " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        await page.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1})


async def _submit_custom_run(
    url: str, steps: int, shots: Path, before_click: Callable[[], None], runs_made: Callable[[], int]
) -> dict:
    """Open the Custom-run form, type `steps` into the attack's Steps field, click Submit; what the page showed.

    If the UI answers Submit with an error toast and `runs_made()` says no run was created, Submit again (at most
    3 times; the errors are in the result). On any failure: a screenshot in `shots` and the page's visible text
    in the assertion message.
    """
    browser = Browser()
    page: Session | None = None
    try:
        async with connect(browser.url, max_size=None) as ws:
            try:
                async with asyncio.timeout(180):
                    page = await open_page(ws, url, height=1600, load_timeout=60)
                    await _until(page, f"{STEPS_INPUT} !== null", 90, "the attack form's Steps input")
                    await _settle(page)
                    shown = await page.evaluate(f"{STEPS_INPUT}.value")
                    # what typing does: focus the field, select its content, type over it, leave the field
                    await page.evaluate(
                        f"(() => {{ const i = {STEPS_INPUT}; window.__eightgenTyped = i;"
                        " i.scrollIntoView({block: 'center'}); i.focus(); i.select(); })()"
                    )
                    await page.send("Input.insertText", {"text": str(steps)})
                    await page.evaluate(f"{STEPS_INPUT}.blur()")
                    typed = await page.evaluate(f"{STEPS_INPUT}.value")
                    assert typed == str(steps), f"the Steps field shows {typed!r} after typing {steps}"
                    # the form passes an edit up through debounced (10 ms per nesting level) updates: a click right after
                    # typing submits the old value. A user pauses; so does the test, then checks what the user would see
                    await _settle(page, quiet=0.5)
                    kept = await page.evaluate(f"({{value: {STEPS_INPUT}.value, same: {STEPS_INPUT} === window.__eightgenTyped}})")
                    assert kept == {"value": str(steps), "same": True}, f"the Steps field changed after typing {steps}: {kept}"
                    assert await page.evaluate(f"{SUBMIT_BUTTON} !== undefined"), "no Submit button"
                    before_click()
                    errors: list[str] = []
                    for _ in range(3):
                        await _click(page, SUBMIT_BUTTON)
                        outcome = await _until(page, SUBMIT_OUTCOME, 60, "the run-scheduled toast")
                        if "run" in outcome:
                            location = await page.evaluate("location.href")
                            return {"shown": shown, "typed": typed, "toast": outcome["run"], "location": location, "errors": errors}
                        # a user reads the error, closes it and submits again, unless a run was made after all
                        errors.append(f"{outcome['error']!r}, failed requests: {_failed_responses(page.events)}")
                        made = await asyncio.to_thread(runs_made)
                        assert made == 0, f"the UI showed an error, yet {made} flow run(s) were created: {errors}"
                        await page.evaluate("Array.from(document.querySelectorAll('button')).filter(b => b.textContent.trim() === 'Close').forEach(b => b.click())")
                        await _until(page, "!document.body.innerText.includes('Something went wrong')", 20, "the error toast to close")
                        kept = await page.evaluate(f"{STEPS_INPUT}.value")
                        assert kept == str(steps), f"the Steps field shows {kept!r} after a failed Submit"
                    raise AssertionError(f"Submit failed {len(errors)} times: {errors}")
            except (AssertionError, TimeoutError) as exc:
                text, shot = "(no page)", shots / "custom-run-failure.png"
                if page is not None:
                    try:
                        async with asyncio.timeout(20):
                            data = await page.send("Page.captureScreenshot", {"format": "png"})
                            shot.write_bytes(base64.b64decode(data["data"]))
                            text = await page.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                    except Exception as inner:  # the diagnosis must not hide the failure
                        text += f" (diagnosis failed: {inner!r})"
                problems = (page.problems() + _failed_responses(page.events)) if page is not None else []
                raise AssertionError(
                    f"Custom-run form at {url}: {exc or type(exc).__name__}\nscreenshot: {shot}\nproblems: {problems}\npage text:\n{text}"
                ) from exc
    finally:
        browser.close()


def test_rerun_attack_from_the_ui_form_in_a_real_browser(served: dict, real_run: dict, server: str, tmp_path: Path) -> None:
    # what the README promises: follow the printed link, change Steps in the pre-filled attack form, Submit
    dep = deployment("rerun-attack/manual")
    link = _link_from_log(served["log"], served["proc"])
    assert link == f"{server.removesuffix('/api')}/deployments/deployment/{dep.id}/run"
    source = find_run(served["runs"])  # "run" stays empty: the newest run, whichever test made it
    source_record = load_record(source)
    assert (source_record.dataset.sha256, source_record.model.sha256) == (
        real_run["record"].dataset.sha256, real_run["record"].model.sha256
    )
    flow_filter = FlowFilter(name=FlowFilterName(any_=["rerun-attack"]))
    with get_client(sync_client=True) as client:
        known = {r.id for r in client.read_flow_runs(flow_filter=flow_filter)}
    before = {p for p in served["runs"].iterdir() if p.is_dir()}
    clicked: list[datetime] = []

    # the flow runs made since, read through the API
    def created() -> list:
        with get_client(sync_client=True) as client:
            return [r for r in client.read_flow_runs(flow_filter=flow_filter) if r.id not in known]

    seen = asyncio.run(
        _submit_custom_run(link, 200, tmp_path, lambda: clicked.append(datetime.now(timezone.utc)), lambda: len(created()))
    )
    assert seen["shown"] == str(dep.parameters["attack"]["steps"]), seen  # the form came pre-filled with the served settings

    deadline = time.monotonic() + 30
    while not created() and time.monotonic() < deadline:
        time.sleep(0.5)
    runs = created()
    assert len(runs) == 1, (runs, served["log"].read_text()[-3000:])
    (flow_run,) = runs
    assert flow_run.name == seen["toast"] and flow_run.deployment_id == dep.id, (flow_run.name, seen)
    assert flow_run.created >= clicked[0] - timedelta(seconds=5), (flow_run.created, clicked)
    assert flow_run.parameters["run"] == "" and flow_run.parameters["attack"]["steps"] == 200, flow_run.parameters
    # nothing else in the form changed on the way: the other fields are the served settings
    assert flow_run.parameters["attack"] == dep.parameters["attack"] | {"steps": 200}, flow_run.parameters
    assert {k: flow_run.parameters[k] for k in ("runs_root", "cache_dir")} == {k: dep.parameters[k] for k in ("runs_root", "cache_dir")}

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run.id)
        if flow_run.state is not None and flow_run.state.is_final():
            break
        assert served["proc"].poll() is None, served["log"].read_text()[-3000:]
        time.sleep(1)
    assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, served["log"].read_text()[-3000:])

    new = _new_run(served, real_run, before)
    results = pd.read_parquet(new / "results.parquet")
    assert len(results) == real_run["rows"] and (results["steps"] == 200).all(), results[["run_id", "steps"]]
    record = load_record(new)
    assert (record.dataset.sha256, record.model.sha256) == (real_run["record"].dataset.sha256, real_run["record"].model.sha256)
    assert record.config.attack == source_record.config.attack.model_copy(update={"steps": 200})
    assert record.config.run_label == new.name and record.run_name == new.name
    assert tree_hashes(real_run["dir"]) == real_run["hashes"]  # the source run is untouched
    _check_published(flow_run, new, served["port"])
    states = _task_states(flow_run.id)
    assert "train-classifier" not in states and "assemble-dataset" not in states, states
    assert states["optimize-chunk"] == ["Completed"] * TINY_CHUNKS, states


def test_a_run_cancelled_from_the_ui_stops_in_seconds_and_the_next_reuses_its_chunks(served: dict, real_run: dict) -> None:
    from prefect.states import Cancelling

    attack = deployment("rerun-attack/manual").parameters["attack"] | {"steps": 9}
    parameters = {"run": real_run["dir"].name, "attack": attack}
    served["hold"].unlink()  # armed: chunk 2 holds, written but not yet published
    flow_run = run_deployment("rerun-attack/manual", parameters=parameters, timeout=0)
    wait_for(lambda: served["hold"].exists() and served["hold"].read_text() != "", 300, "chunk 2 held", served["proc"], served["log"])
    holder = int(served["hold"].read_text())
    started = time.monotonic()
    with get_client(sync_client=True) as client:  # what the UI's Cancel button does
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        while not (state := client.read_flow_run(flow_run.id).state).is_final():
            assert time.monotonic() - started < 60, state
            time.sleep(0.2)
    stopped = time.monotonic() - started
    assert state.is_cancelled(), state
    assert stopped < 15, stopped
    with pytest.raises(ProcessLookupError):
        os.kill(holder, 0)  # the flow run's process, and the chunk it held, are gone
    staged = [p for root in (served["cache"], served["runs"]) for kind in ("partial", "new", "old") for p in root.rglob(f".*.{kind}-*")]
    assert staged == [], staged  # nothing half-written is left
    states = _task_states(flow_run.id)
    assert states["optimize-chunk"].count("Completed") == 2 and "Running" not in states["optimize-chunk"], states
    # the same settings again: the two finished chunks come back Cached, the abandoned one is computed
    again = run_deployment("rerun-attack/manual", parameters=parameters, timeout=600, poll_interval=1)
    assert again.state.is_completed(), (again.state, served["log"].read_text()[-3000:])
    assert sorted(_task_states(again.id)["optimize-chunk"]) == ["Cached", "Cached", "Completed"]


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
    # the others: the nightly deployment's scheduled runs, and runs of the serving tests into their own runs root
    (root,) = [r for r in runs if r.deployment_id is None and r.parameters["cfg"]["runs_root"] == where[3]]
    states = _task_states(root.id)
    assert {k: len(v) for k, v in states.items()} == expected, states
    assert all(s in ("Completed", "Cached") for v in states.values() for s in v), states
    # the embedded run: its API is gone with the process, its database holds every task run, final
    recorded = embedded_task_states(ephemeral_home)
    assert {k: len(v) for k, v in recorded.items()} == expected, recorded
    assert {s for v in recorded.values() for s in v} <= {"Completed", "Cached"}, recorded
    assert set(recorded["train-classifier"] + recorded["optimize-chunk"]) == {"Cached"}, recorded


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
