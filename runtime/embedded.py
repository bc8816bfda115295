"""A local Prefect API server shared by the commands of one Prefect home, kept up a while between them.

Prefect's own ephemeral server starts inside the first flow call, after importing its server package
(~5 s on 2 cores) into the command's process, and dies with it. Here the command starts the same uvicorn
app at once in a detached process (runtime/prefect_server.py), so it boots while the checks run, and the
next command in the same Prefect home reuses it: a second run does not wait for a server at all.

Each command holds a lease on the server it uses (a file named by its pid, in a folder named by the server's
pid); the server exits after $EIGHTGEN_SERVER_IDLE_SECONDS (default 600) with no live lease, at once when that
is 0, and as soon as it has none once another server has taken its place. Concurrent commands share one
server, so one process writes the Prefect database.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from eightgen.errors import EightgenError

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = 180.0  # Prefect's 20 s is too short on a busy machine
IDLE = "EIGHTGEN_SERVER_IDLE_SECONDS"
DEFAULT_IDLE = 600.0
STATE, LOCK, LEASES, LOG = "eightgen-server.json", "eightgen-server.lock", "eightgen-server.leases", "eightgen-server.log"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_seconds() -> float:
    """How long the server waits for the next command once no command uses it."""
    value = os.environ.get(IDLE) or DEFAULT_IDLE
    try:
        seconds = float(value)
    except ValueError:
        raise EightgenError(f"{IDLE}={value!r}: give a number of seconds (0 stops the server with each command)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise EightgenError(f"{IDLE}={value!r}: give a finite number of seconds, 0 or more")
    return seconds


def alive(pid: int) -> bool:
    """Whether a process with this pid runs (an exited child of this process is reaped, not counted)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        pass  # not a child of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited process nobody has reaped yet (a container's init may never do it)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def locked(home: Path) -> Iterator[None]:
    """Hold the Prefect home's server lock: one command at a time finds, starts or stops the server."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lease_dir(home: Path, server_pid: int) -> Path:
    """The folder holding the leases on one server."""
    return home / LEASES / str(server_pid)


def live_leases(leases: Path) -> list[int]:
    """The pids of the commands holding a lease in this folder now (leases of dead processes are removed)."""
    found = []
    for lease in leases.glob("*") if leases.is_dir() else []:
        pid = int(lease.name) if lease.name.isdigit() else -1
        if pid > 0 and alive(pid):
            found.append(pid)
        else:
            lease.unlink(missing_ok=True)
    return found


def _identity() -> dict[str, str]:
    """What a reusable server must share with this command: the Python environment and Prefect's version."""
    import prefect

    return {"python": sys.prefix, "prefect": prefect.__version__}


def recorded(home: Path) -> dict | None:
    """The server state file of this Prefect home as written (pid, url, identity), or None if absent or unreadable."""
    try:
        state = json.loads((home / STATE).read_text())
        return {**state, "pid": int(state["pid"]), "url": str(state["url"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_state(home: Path) -> dict | None:
    """The recorded server of this Prefect home if its process still runs and matches this command."""
    state = recorded(home)
    if state is None or not alive(state["pid"]) or {k: state.get(k) for k in _identity()} != _identity():
        return None
    return state


class EmbeddedServer:
    """The command's Prefect API: wait() for it before the first flow, stop() at the end (releases the lease)."""

    def __init__(self) -> None:
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            get_current_settings,
        )

        self.url: str | None = None
        self.pid: int | None = None
        self.child: subprocess.Popen | None = None
        self.idle = idle_seconds()
        self.home = Path(get_current_settings().home).expanduser()
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return  # a real server is configured, or Prefect will refuse by itself
        with locked(self.home):
            self._find_or_start()

    def _find_or_start(self) -> None:
        """Use the recorded server of this Prefect home, or start one, and hold a lease on it (with the lock held)."""
        state = read_state(self.home)
        if state is None:
            self._spawn()
        else:
            self.pid, self.url = state["pid"], state["url"]
        self._lease()

    def _lease(self) -> None:
        """Hold a lease on the server (with the lock held)."""
        leases = lease_dir(self.home, self.pid)
        leases.mkdir(parents=True, exist_ok=True)
        (leases / str(os.getpid())).touch()

    def _release(self) -> None:
        """Give up the lease on the server (with the lock held)."""
        (lease_dir(self.home, self.pid) / str(os.getpid())).unlink(missing_ok=True)

    @property
    def outlives_command(self) -> bool:
        """Whether the API stays up after this command, so that it records what it was sent by itself."""
        return self.pid is None or self.idle > 0

    def _spawn(self) -> None:
        from prefect.settings import get_current_settings

        port = free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env.pop("PREFECT_API_URL", None)
        with open(self.home / LOG, "ab") as log:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "runtime.prefect_server", "--port", str(port), "--home", str(self.home), "--idle", str(self.idle)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        self.pid, self.url = self.child.pid, f"http://127.0.0.1:{port}/api"
        state = {"pid": self.pid, "url": self.url, **_identity()}
        tmp = self.home / f"{STATE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.home / STATE)

    def _exit_line(self) -> str:
        try:
            lines = (self.home / LOG).read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else "no message"

    def wait(self) -> AbstractContextManager:
        """Block until the server answers; a context that points Prefect at it (EightgenError if it never does)."""
        if self.pid is None:
            return nullcontext()
        import httpx
        from prefect.settings import PREFECT_API_URL, temporary_settings

        limit = float(os.environ.get(STARTUP_TIMEOUT) or DEFAULT_STARTUP_TIMEOUT)
        deadline, respawned = time.monotonic() + limit, False
        while time.monotonic() < deadline:
            if not alive(self.pid):
                if not respawned:  # its port was taken meanwhile, or it stopped as we came: start one more
                    respawned = True
                    with locked(self.home):
                        self._release()
                        self._find_or_start()
                    continue
                raise EightgenError(f"Prefect's local server exited: {self._exit_line()} (log: {self.home / LOG})")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return temporary_settings({PREFECT_API_URL: self.url})
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(force=True)
        raise EightgenError(
            f"Prefect's local server did not answer within {limit:g} s (a busy machine?): run again, "
            f"raise {STARTUP_TIMEOUT}, or start `prefect server start` and set PREFECT_API_URL"
        )

    @property
    def log(self) -> Path:
        """The local server's log file."""
        return self.home / LOG

    def health(self) -> str:
        """UP when the server answers, GONE when its process has exited, SILENT otherwise (stopping.UP/GONE/SILENT)."""
        import httpx

        from runtime.stopping import GONE, SILENT, UP

        if self.pid is not None and not alive(self.pid):
            return GONE
        try:
            return UP if httpx.get(f"{self.url}/health", timeout=2).status_code == 200 else SILENT
        except httpx.HTTPError:
            return SILENT

    def stop(self, force: bool = False, wait: bool = True) -> None:
        """Give up this command's lease; stop the server now if it is not to be kept and no other command uses it (without
        waiting for it to exit when not `wait`: a command stopped halfway)."""
        if self.pid is None:
            return
        with locked(self.home):
            self._release()
            if (force or self.idle == 0) and not live_leases(lease_dir(self.home, self.pid)):
                _terminate(self.pid, self.child, wait)
                state = read_state(self.home)
                if state is None or state["pid"] == self.pid:
                    (self.home / STATE).unlink(missing_ok=True)
        self.pid = None


def _terminate(pid: int, child: subprocess.Popen | None, wait: bool = True) -> None:
    """Stop a server process: SIGTERM, then (if waiting) SIGKILL after 10 s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return
        if child is None and not alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if child is not None:
        child.wait()
