"""A local Prefect API server for one command, started at once in a subprocess so it boots while the checks run.

Prefect's own ephemeral server does the same from inside the first flow call, after importing its server
package (~5 s on 2 cores) into the command's process; this starts the same uvicorn app without that import,
waits longer on a busy machine, and stops with one line saying what to do when it never answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from eightgen.errors import EightgenError

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = 180.0  # Prefect's 20 s is too short on a busy machine
PORT_IN_USE = 3  # uvicorn's exit code when its port is taken


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """The command's own Prefect API: wait() for it before the first flow, stop() it at the end."""

    def __init__(self) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self._errors = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return  # a real server is configured, or Prefect will refuse by itself
        self._spawn()

    def _spawn(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        app_dir = str(Path(prefect.__file__).parent.parent)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._errors,
        )

    def wait(self) -> AbstractContextManager:
        """Block until the server answers; a context that points Prefect at it (EightgenError if it never does)."""
        if self.process is None:
            return nullcontext()
        import httpx
        from prefect.settings import PREFECT_API_URL, temporary_settings

        limit = float(os.environ.get(STARTUP_TIMEOUT) or DEFAULT_STARTUP_TIMEOUT)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:
                self._spawn()
                continue
            if code is not None:
                self._errors.seek(0)
                err = self._errors.read().decode(errors="replace").strip().splitlines()
                raise EightgenError(f"Prefect's embedded server exited with code {code}: {err[-1] if err else 'no message'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return temporary_settings({PREFECT_API_URL: self.url})
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise EightgenError(
            f"Prefect's embedded server did not answer within {limit:g} s (a busy machine?): run again, "
            f"raise {STARTUP_TIMEOUT}, or start `prefect server start` and set PREFECT_API_URL"
        )

    def stop(self) -> None:
        """Stop the server (if this command started one)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
