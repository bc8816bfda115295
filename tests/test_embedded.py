"""The local Prefect server: kept between commands of one Prefect home, shared by concurrent ones, stopped when idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from eightgen.errors import EightgenError
from runtime.embedded import IDLE, STATE, alive, idle_seconds, lease_dir, live_leases, read_state
from runtime.prefect_server import watch

ROOT = Path(__file__).resolve().parents[1]
CLIENT = (
    "import json; from runtime.embedded import EmbeddedServer; s = EmbeddedServer(); t0 = __import__('time').monotonic(); "
    "s.wait(); print(json.dumps({'pid': s.pid, 'url': s.url, 'waited': __import__('time').monotonic() - t0})); s.stop()"
)


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _client(home: Path, idle: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", IDLE: idle}
    done = subprocess.run([sys.executable, "-c", CLIENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_idle_seconds_must_be_a_finite_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IDLE, "45")
    assert idle_seconds() == 45.0
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(IDLE, bad)
        with pytest.raises(EightgenError, match=IDLE):
            idle_seconds()


def test_leases_of_dead_commands_are_dropped(tmp_path: Path) -> None:
    leases = lease_dir(tmp_path, 1234)
    leases.mkdir(parents=True)
    dead = _dead_pid()
    for pid in (os.getpid(), dead):
        (leases / str(pid)).touch()
    (leases / "junk").touch()
    assert live_leases(leases) == [os.getpid()]
    assert sorted(p.name for p in leases.iterdir()) == [str(os.getpid())]
    assert alive(os.getpid()) and not alive(dead)


def test_a_recorded_server_is_reused_only_while_it_runs_the_same_python(tmp_path: Path) -> None:
    import prefect

    state = {"pid": os.getpid(), "url": "http://127.0.0.1:1/api", "python": sys.prefix, "prefect": prefect.__version__}
    (tmp_path / STATE).write_text(json.dumps(state))
    assert read_state(tmp_path)["pid"] == os.getpid()
    (tmp_path / STATE).write_text(json.dumps(state | {"pid": _dead_pid()}))
    assert read_state(tmp_path) is None
    (tmp_path / STATE).write_text(json.dumps(state | {"prefect": "0.0.1"}))
    assert read_state(tmp_path) is None
    (tmp_path / STATE).write_text("{not json")
    assert read_state(tmp_path) is None


def test_the_watchdog_stops_an_idle_server_and_keeps_a_used_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.prefect_server.POLL_SECONDS", 0.01)
    leases = lease_dir(tmp_path, os.getpid())  # the watchdog runs in this process: these are its leases
    leases.mkdir(parents=True)
    (tmp_path / STATE).write_text(json.dumps({"pid": os.getpid(), "url": "x"}))
    (leases / str(os.getpid())).touch()
    server = SimpleNamespace(should_exit=False)
    watcher = __import__("threading").Thread(target=watch, args=(server, tmp_path, 0.2), daemon=True)
    watcher.start()
    time.sleep(0.5)
    assert not server.should_exit  # a live lease keeps it
    (leases / str(os.getpid())).unlink()
    watcher.join(timeout=5)
    assert server.should_exit and not (tmp_path / STATE).exists() and not leases.exists()
    # a server whose state file names another server stops, once unused, without touching that file
    (tmp_path / STATE).write_text(json.dumps({"pid": _dead_pid() + 100000, "url": "y"}))
    other = SimpleNamespace(should_exit=False)
    watch_thread = __import__("threading").Thread(target=watch, args=(other, tmp_path, 60), daemon=True)
    watch_thread.start()
    watch_thread.join(timeout=5)
    assert other.should_exit and (tmp_path / STATE).exists()


@pytest.mark.slow
def test_the_next_command_reuses_the_server_which_stops_once_idle(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _client(home, "600")  # kept, and held by this test while the next command comes and goes
    leases = lease_dir(home, first["pid"])
    (leases / str(os.getpid())).touch()
    second = _client(home, "3")
    assert second["pid"] == first["pid"] and second["url"] == first["url"]
    assert second["waited"] < 2.0  # it answered at once: no boot
    assert httpx.get(f"{first['url']}/health", timeout=5).status_code == 200
    (leases / str(_dead_pid())).touch()  # a command killed with -9 leaves its lease behind
    # a command from another environment cannot use it: it starts its own, and the first stops once unused
    state = json.loads((home / STATE).read_text())
    (home / STATE).write_text(json.dumps(state | {"python": "/elsewhere"}))
    other = _client(home, "600")
    assert other["pid"] != first["pid"] and alive(first["pid"])  # still held by this test
    (leases / str(os.getpid())).unlink()
    deadline = time.monotonic() + 60
    while alive(first["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(first["pid"]), "the idle server did not stop"
    assert not leases.exists() and json.loads((home / STATE).read_text())["pid"] == other["pid"]
    os.kill(other["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(other["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    fresh = _client(home, "0")  # idle 0: a command's own server, gone with it
    assert fresh["pid"] not in (first["pid"], other["pid"]) and not alive(fresh["pid"]) and not (home / STATE).exists()
