"""Where the wall time of `eightgen run` goes: cold, warm (all cached) with the local server kept from the cold run,
warm with a fresh local server, and warm against a running `prefect server start`.

    python -m benchmarks.startup --mnist-dir ../shared/datasets/mnist [more eightgen run options]

All runs use one fresh cache dir and runs root, one after the other; each is a real `eightgen run`
subprocess. The CLI marks its phases (EIGHTGEN_PHASES); time inside task runs comes from the Prefect
database afterwards. A local server boots in its own process while the data is checked and the flows are
imported, so "waiting for the server" is only what is left of its start-up; a kept one is not waited for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from runtime.embedded import IDLE, free_port, recorded

ROWS = [
    ("python + CLI imports", "start", "imported"),
    ("settings and data checks", "imported", "checked"),
    ("flow imports", "checked", "flows imported"),
    ("waiting for the server", "flows imported", "server up"),
    ("pipeline flow", "server up", "flow done"),
    ("records flushed", "flow done", "recorded"),
    ("exit", "recorded", "end"),
]


def prefect_env(home: Path, api: str | None = None, idle: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != IDLE}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return env | ({"PREFECT_API_URL": api} if api else {}) | ({IDLE: idle} if idle is not None else {})


def stop_kept_server(home: Path) -> None:
    """Stop the local server a run left running for the next command in this Prefect home."""
    state = recorded(home)
    if state is not None:
        try:
            os.kill(state["pid"], signal.SIGTERM)
        except OSError:
            pass


def _task_seconds_sqlite(db: Path, marks: dict[str, float]) -> float:
    """Seconds inside the task runs (start to end, summed) of one timed run, from a local Prefect database."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT start_time, end_time FROM task_run WHERE start_time IS NOT NULL AND end_time IS NOT NULL AND id NOT IN "
            "(SELECT parent_task_run_id FROM flow_run WHERE parent_task_run_id IS NOT NULL)"  # subflow stand-ins
        ).fetchall()
    spans = [(when(a), when(b)) for a, b in rows]
    return sum(b - a for a, b in spans if marks["start"] <= a and b <= marks["end"])


def when(value: str) -> float:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def timed_run(options: list[str], env: dict[str, str], phases: Path) -> dict[str, float]:
    """One `eightgen run` subprocess; its phase marks as seconds since the process was started."""
    phases.unlink(missing_ok=True)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", *options], env=env | {"EIGHTGEN_PHASES": str(phases)}, capture_output=True, text=True
    )
    ended = time.time()
    if done.returncode != 0:
        sys.exit(f"benchmarks.startup: eightgen run failed:\n{done.stderr[-2000:]}")
    marks = {"start": started, "end": ended}
    for line in phases.read_text().splitlines():
        item = json.loads(line)
        marks[item["phase"]] = item["time"]
    return marks


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=prefect_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("benchmarks.startup: prefect server start did not answer within 180 s")


def table(columns: dict[str, dict[str, float]], title: str) -> str:
    """The phases of each timed run side by side (seconds), then the same as one JSON line."""
    width, lines = 28, [title, f"{'phase':<28}" + "".join(f"{name:>24}" for name in columns)]
    for label, a, b in ROWS:
        cells = [f"{m[b] - m[a]:>22.2f} s" if a in m and b in m else f"{'—':>24}" for m in columns.values()]
        lines.append(f"{label:<{width}}" + "".join(cells))
    lines.append(f"{'  of the flow: inside tasks':<{width}}" + "".join(
        f"{m['tasks']:>22.2f} s" if m.get("tasks", math.nan) == m.get("tasks", math.nan) else f"{'—':>24}" for m in columns.values()))
    lines.append(f"{'total wall':<{width}}" + "".join(f"{m['end'] - m['start']:>22.2f} s" for m in columns.values()))
    lines.append(json.dumps({
        k: {r[0]: round(v[r[2]] - v[r[1]], 3) for r in ROWS if r[1] in v and r[2] in v} | {"total": round(v["end"] - v["start"], 3)}
        for k, v in columns.items()
    }))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run cold, warm (kept server), warm (fresh server) and warm against a running server; print the phases side by side."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    given = parser.parse_known_args(argv)[1]  # everything else is an eightgen run option
    options = given or ["--preset", "quick"]
    tmp = Path(tempfile.mkdtemp(prefix="eightgen-startup-"))
    options = [*options, "--cache-dir", str(tmp / "cache"), "--runs-root", str(tmp / "runs")]
    home = tmp / "home"
    # a user's machine already has a Prefect database: create one first (migrations), outside the measurement
    boot = "from runtime.embedded import EmbeddedServer; s = EmbeddedServer(); s.wait(); s.stop()"
    subprocess.run([sys.executable, "-c", boot], env=prefect_env(home, idle="0"), capture_output=True, check=True)
    load_before = os.getloadavg()[0]
    columns = {}
    kept, fresh = tmp / "home-kept", tmp / "home-fresh"
    shutil.copytree(home, kept)
    shutil.copytree(home, fresh)
    try:
        # cold starts the local server and leaves it up; the warm run after it reuses it
        for label, db_home, idle in (("cold", kept, None), ("warm", kept, None), ("warm, fresh server", fresh, "0")):
            columns[label] = timed_run(options, prefect_env(db_home, idle=idle), tmp / "phases.jsonl")
    finally:
        stop_kept_server(kept)
    time.sleep(2)  # the kept server's last writes
    for label, db_home in (("cold", kept), ("warm", kept), ("warm, fresh server", fresh)):
        columns[label]["tasks"] = _task_seconds_sqlite(db_home / "prefect.db", columns[label])
    proc, api = _start_server(tmp / "home-server")
    try:
        marks = timed_run(options, prefect_env(tmp / "home-client", api), tmp / "phases.jsonl")
        marks["tasks"] = float("nan")
        columns["warm, running server"] = marks
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    load_after = os.getloadavg()[0]
    title = f"eightgen run {' '.join(given or ['--preset', 'quick'])}  (load average {load_before:.1f} -> {load_after:.1f}, {os.cpu_count()} cores)"
    print(table(columns, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
