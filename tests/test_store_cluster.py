"""Workers anywhere: the pipeline on a real S3-compatible server (moto's, standing in for S3), a real redis-server and a
Dask cluster whose workers are processes of their own, each with its own empty working directory and no shared disk."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from upath import UPath

from cli.main import main
from eightgen.artifacts import read_manifest
from eightgen.rundir import RESULTS, local_run
from eightgen.store import SCRATCH_ENV, children
from runtime.locks import HOLD_ENV
from helpers import TINY, embedded_task_states, shared_cache
from tasks.faults import HOLD_CHUNK, HOLD_IN, HOLD_MARKER

pytestmark = pytest.mark.slow  # a store, a Redis, a cluster and three pipeline runs: the full suite only

SETTINGS = [*TINY, "--digits", "1,3,5", "--steps", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(scratch: Path, **more: str) -> dict[str, str]:
    """The environment of a process of this test: the store's, its own copy folder, nothing of the test's Prefect;
    Redis locks of a killed holder free themselves after 3 s instead of 15."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EIGHTGEN_"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", SCRATCH_ENV: str(scratch), HOLD_ENV: "3", **more}


@pytest.fixture
def hosts(s3_server: str, tmp_path: Path) -> Iterator[tuple[str, list[Path]]]:
    """A Dask scheduler and 2 workers (1 thread each), each in an empty folder of its own, as if on other hosts; a
    held chunk (EIGHTGEN_HOLD_IN) waits in a worker until the test kills it. The scheduler's address and worker folders."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    scheduler = tmp_path / "scheduler"
    scheduler.mkdir()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        cwd=scheduler, env=_env(scheduler / "scratch"), stdout=(scheduler / "log").open("w"), stderr=subprocess.STDOUT,
    ))
    homes = []
    hold = {HOLD_IN: "optimize-chunk", HOLD_CHUNK: "1", HOLD_MARKER: str(tmp_path / "held")}
    for i in range(2):
        home = tmp_path / f"worker{i}"
        home.mkdir()
        homes.append(home)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
             "--local-directory", str(home / "dask")],
            cwd=home, env=_env(home / "scratch", **hold), stdout=(home / "log").open("w"), stderr=subprocess.STDOUT,
        ))
    from distributed import Client

    with Client(address, timeout="60s", set_as_default=False) as client:
        client.wait_for_workers(2, timeout=120)
    yield address, homes
    for p in procs:
        p.kill()
        p.wait()


def _eightgen(folder: Path, *args: str, timeout: float = 600) -> str:
    """`eightgen` run in an empty folder of its own (its Prefect home and copies under it); its output."""
    work = folder / "cwd"
    work.mkdir(parents=True, exist_ok=True)
    env = _env(folder / "scratch", PREFECT_HOME=str(folder / "prefect"), EIGHTGEN_SERVER_IDLE_SECONDS="0")
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_a_cluster_without_a_shared_disk_runs_from_the_store(
    bucket: str, redis_url: str, hosts: tuple[str, list[Path]], mnist_dir: Path, tmp_path: Path, tmp_path_factory, monkeypatch, capsys
) -> None:
    address, homes = hosts
    store = ["--cache-dir", f"{bucket}/cache", "--runs-root", f"{bucket}/runs", "--mnist-dir", str(mnist_dir)]
    client = tmp_path / "client"
    # the thread runner on local disk, with the session's tiny cache (its detector is trained once per session)
    threads = ["--cache-dir", str(shared_cache(tmp_path_factory)), "--runs-root", str(tmp_path / "runs"), "--mnist-dir", str(mnist_dir)]
    _eightgen(client / "threads", "run", *SETTINGS, *threads, "--run-name", "threads")

    # the same starts on the cluster, from a cache in the bucket; the worker running chunk 1 is killed with it half done
    # (written in its copy, not yet published): Dask runs it again on the other worker, which waits for the dead
    # worker's Redis lock to expire and finds no trace of the chunk in the store
    dask = ["--dask-address", address, "--lock-url", redis_url]
    marker = tmp_path / "held"
    killed: dict[str, int] = {}

    def kill_the_holder() -> None:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the pid is written
        killed["pid"] = int(marker.read_text())
        killed["published"] = len(UPath(f"{bucket}/cache/attacks").fs.glob(f"{bucket[5:]}/cache/attacks/*/manifest.json"))
        os.kill(killed["pid"], signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_the_holder, daemon=True)
    killer.start()
    out = _eightgen(client / "dask", "run", *SETTINGS, *store, *dask, "--run-name", "on-dask")
    killer.join(1)
    assert killed, "no worker held chunk 1"
    assert f"report: {bucket}/runs/on-dask/report.html" in out

    a = pd.read_parquet(tmp_path / "runs" / "threads" / RESULTS)
    b = pd.read_parquet(local_run(UPath(f"{bucket}/runs/on-dask")) / RESULTS)
    assert len(a) == len(b) == 2 + 2 * 3
    assert a.equals(b), f"the cluster's results differ from the thread runner's:\n{a.compare(b)}"

    # the run's report link, published to Prefect, is a presigned URL that a reader without credentials opens
    with sqlite3.connect(client / "dask" / "prefect" / "prefect.db") as db:
        (link,) = [row[0] for row in db.execute("SELECT data FROM artifact WHERE key LIKE 'report-%'")]
    link = re.search(r"\((http[^)]+)\)", json.loads(link) if link.startswith('"') else link).group(1)
    with urllib.request.urlopen(link, timeout=10) as answer:
        assert answer.read() == UPath(f"{bucket}/runs/on-dask/report.html").read_bytes()

    # every chunk in the store is whole and was made in a worker's copy folder; the killed worker's half-written chunk
    # is still there, in its copy folder only
    chunks = children(UPath(f"{bucket}/cache/attacks"))
    assert len(chunks) == 4 and all(read_manifest(c)["files"] for c in chunks)
    assert killed["published"] < 4
    copies = [home / "scratch" / "s3" / bucket[5:] / "cache" / "attacks" for home in homes]
    assert {p.name for c in copies for p in c.glob("[!.]*")} == {c.name for c in chunks}
    assert len([p for c in copies for p in c.glob(".*.partial-*")]) == 1
    # nothing is written to local disk but temporary files: working folders stay empty
    for folder in [client / "threads" / "cwd", client / "dask" / "cwd", *homes]:
        left = sorted(p.name for p in folder.iterdir() if p.name not in ("scratch", "dask", "log"))
        assert left == [], (folder, left)

    # a second run on the cluster comes back all Cached, its records read from the store
    _eightgen(client / "again", "run", *SETTINGS, *store, *dask, "--run-name", "on-dask")
    states = embedded_task_states(client / "again" / "prefect")
    stages = ("assemble-dataset", "train-classifier", "optimize-chunk", "collect-results", "render-report")
    assert {name: states.get(name) for name in stages} == {name: ["Cached"] * (4 if name == "optimize-chunk" else 1) for name in stages}

    # the runs in the store are listed and re-rendered from there
    monkeypatch.setenv(SCRATCH_ENV, str(client / "reader"))
    assert main(["runs", "--runs-root", f"{bucket}/runs"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("on-dask ") and f"{bucket}/runs/on-dask/report.html" in listed
    before = UPath(f"{bucket}/runs/on-dask/report.manifest.json").read_bytes()
    assert main(["report", f"{bucket}/runs/on-dask"]) == 0
    assert f"report: {bucket}/runs/on-dask/report.html" in capsys.readouterr().out
    assert UPath(f"{bucket}/runs/on-dask/report.manifest.json").read_bytes() != before  # published back
