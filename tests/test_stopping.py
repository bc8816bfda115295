"""A command stopped halfway: Ctrl-C, SIGTERM or a lost Prefect server end it in seconds with one line; the rerun
continues from the finished chunks and ends with a clean run's results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import TINY, embedded_task_states, run_bytes, tiny_config
from runtime.embedded import IDLE, STATE
from tasks.faults import HOLD_CHUNK, HOLD_IN, HOLD_MARKER

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [*TINY, "--chunk-size", "2", "--run-name", "stopped"]  # 6 starts: 3 chunks
KEPT = "finished work is kept: run the same command to continue"
STAGING = (".*.partial-*", ".*.new-*", ".*.old-*")


# ---------------------------------------------------------------- the stopper alone (fast)


STOPPER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from eightgen.artifacts import fresh_sibling
    from runtime.stopping import GONE, UP, Stopper, track_chunks

    out = Path(sys.argv[1])
    staged = fresh_sibling(out / "thing", "partial")  # a write in progress
    health = lambda: GONE if (out / "kill-server").exists() else UP
    stopper = Stopper(mark=lambda reason: (out / "marked").write_text(reason), release=lambda: (out / "released").touch(),
                      health=health, lost_line="eightgen: error: server lost")
    with stopper:
        (out / "ready").touch()
        time.sleep(60)
    """
)


def _stopper_process(tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STOPPER_SCRIPT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_ends_the_process_with_one_line(tmp_path: Path, signum: int, code: int, word: str) -> None:
    proc = _stopper_process(tmp_path)
    started = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 2
    assert proc.returncode == code
    assert err.splitlines() == [f"eightgen: {word}; {KEPT}"] and out == ""
    assert (tmp_path / "marked").read_text() == f"eightgen: {word}; {KEPT}" and (tmp_path / "released").exists()
    assert not list(tmp_path.glob(".thing.partial-*"))  # the write in progress is cleared


def test_a_lost_server_ends_the_process_with_one_line(tmp_path: Path) -> None:
    proc = _stopper_process(tmp_path)
    started = time.monotonic()
    (tmp_path / "kill-server").touch()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 2
    assert (proc.returncode, err.splitlines(), out) == (2, ["eightgen: error: server lost"], "")
    assert not (tmp_path / "marked").exists()  # a lost server is not told anything
    assert (tmp_path / "released").exists() and not list(tmp_path.glob(".thing.partial-*"))


# ---------------------------------------------------------------- real commands (slow)


class Command:
    """`eightgen run SETTINGS <options>` in a subprocess with its own Prefect home (a local server it starts)."""

    def __init__(self, base: Path, mnist_dir: Path, home: Path) -> None:
        self.base, self.mnist_dir, self.home = base, mnist_dir, home

    def argv(self, cache: Path, runs: Path, *options: str) -> list[str]:
        """The command line."""
        where = ["--mnist-dir", str(self.mnist_dir), "--cache-dir", str(cache), "--runs-root", str(runs)]
        return [sys.executable, "-m", "cli.main", "run", *SETTINGS, *where, *options]

    def start(self, cache: Path, runs: Path, *options: str, hold: int | None = None) -> tuple[subprocess.Popen, Path]:
        """Start it (holding chunk `hold` once written, before it is published); the process and its stderr file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(self.home), IDLE: "30"}
        if hold is not None:
            env |= {HOLD_IN: "optimize-chunk", HOLD_CHUNK: str(hold), HOLD_MARKER: str(self.base / "held")}
        (self.base / "held").unlink(missing_ok=True)
        err = self.base / f"stderr-{time.monotonic_ns()}.txt"
        proc = subprocess.Popen(self.argv(cache, runs, *options), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"))
        return proc, err

    def held(self, proc: subprocess.Popen, err: Path) -> None:
        """Wait until the held chunk is reached."""
        deadline = time.monotonic() + 300
        while not (self.base / "held").exists():
            assert proc.poll() is None, f"ended before the hold (code {proc.returncode}):\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.05)

    def stopped(self, cache: Path, runs: Path, *options: str, hold: int, signum: int, code: int) -> list[str]:
        """Start it, send `signum` once chunk `hold` is reached; check it ends within 2 s with `code`; its stderr lines."""
        proc, err = self.start(cache, runs, *options, hold=hold)
        self.held(proc, err)
        started = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=60)
        assert time.monotonic() - started < 2
        assert proc.returncode == code
        return err.read_text().splitlines()

    def run(self, cache: Path, runs: Path, *options: str) -> None:
        """Run it to the end."""
        proc, err = self.start(cache, runs, *options)
        assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]


def staging_left(*roots: Path) -> list[Path]:
    """Hidden staging folders under the roots."""
    return [p for root in roots for pattern in STAGING for p in root.rglob(pattern)]


def flow_states(home: Path) -> list[str]:
    """The state names of every flow run in the local server's database."""
    with sqlite3.connect(home / "prefect.db") as db:
        return [s for (s,) in db.execute("SELECT state_name FROM flow_run")]


@pytest.fixture(scope="module")
def command(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The command, with a cache that already holds the dataset and detector (one run with --steps 5)."""
    base = tmp_path_factory.mktemp("stopping")
    cmd = Command(base, mnist_dir, base / "home")
    cmd.run(base / "cache", base / "runs-trained", "--steps", "5")
    yield cmd
    state = cmd.home / STATE
    if state.exists():  # stop the local server the commands kept
        try:
            os.kill(json.loads(state.read_text())["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def chunk_states(home: Path) -> list[str]:
    """The recorded states of every optimize-chunk task run, oldest first."""
    return embedded_task_states(home).get("optimize-chunk", [])


@pytest.mark.slow
def test_ctrl_c_mid_attack_stops_in_seconds_and_the_rerun_continues(command: Command, mnist_dir: Path) -> None:
    cache, runs, steps = command.base / "cache", command.base / "runs", ("--steps", "6")
    before = len(chunk_states(command.home))
    lines = command.stopped(cache, runs, *steps, hold=2, signum=signal.SIGINT, code=130)
    assert lines[-1] == f"eightgen: interrupted after 2 of 3 chunks; {KEPT}"
    assert not [line for line in lines if "Traceback" in line or "terminate called" in line or "ERROR" in line]
    assert staging_left(cache, runs) == [] and not (runs / "stopped").exists()
    assert "Running" not in flow_states(command.home) and "Cancelled" in flow_states(command.home)
    assert sorted(chunk_states(command.home)[before:]) == ["Completed", "Completed", "Crashed"]

    command.run(cache, runs, *steps)  # the same command again: two chunks come back Cached, one is computed
    assert sorted(chunk_states(command.home)[before + 3 :]) == ["Cached", "Cached", "Completed"]
    # A clean run on a copy of the cache without the chunks computes all three in one go: the same bytes.
    clean = command.base / "clean-cache"
    shutil.copytree(cache, clean, ignore=lambda d, names: ["attacks"] if Path(d) == cache else [])
    command.run(clean, command.base / "runs-clean", *steps)
    got, want = (tiny_config(mnist_dir, c, r, *SETTINGS[len(TINY):], *steps).run_dir for c, r in
                 [(cache, runs), (clean, command.base / "runs-clean")])
    assert run_bytes(got) == run_bytes(want)


@pytest.mark.slow
def test_sigterm_mid_attack_stops_in_seconds(command: Command) -> None:
    cache, runs = command.base / "cache", command.base / "runs-term"
    lines = command.stopped(cache, runs, "--steps", "7", hold=1, signum=signal.SIGTERM, code=143)
    assert lines[-1] == f"eightgen: terminated after 1 of 3 chunks; {KEPT}"
    assert staging_left(cache, runs) == []


@pytest.mark.slow
def test_a_lost_server_stops_the_run_in_seconds(command: Command) -> None:
    cache, runs = command.base / "cache", command.base / "runs-lost"
    proc, err = command.start(cache, runs, "--steps", "8", hold=1)
    command.held(proc, err)
    shown = len(err.read_text().splitlines())
    server = json.loads((command.home / STATE).read_text())["pid"]
    started = time.monotonic()
    os.kill(server, signal.SIGKILL)
    proc.wait(timeout=60)
    assert time.monotonic() - started < 10
    assert proc.returncode == 2
    after = err.read_text().splitlines()[shown:]
    assert 1 <= len(after) <= 3, after
    assert after[-1] == f"eightgen: error: Prefect's local API server stopped answering (its log: {command.home / 'eightgen-server.log'}); {KEPT}"
    assert staging_left(cache, runs) == []
