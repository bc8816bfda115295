"""Prefect's embedded (ephemeral) API server, started early in a thread so it boots while the checks run."""

from __future__ import annotations

import logging
import os
import threading

from eightgen.errors import EightgenError

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = "180"  # Prefect's 20 s is too short on a busy machine


def _not_about_the_temporary_server(record: logging.LogRecord) -> bool:
    return "temporary server" not in record.getMessage()


class EmbeddedServer:
    """The embedded server booting in a thread: wait() for it before the first flow, or discard() it on an early error."""

    def __init__(self) -> None:
        os.environ.setdefault(STARTUP_TIMEOUT, DEFAULT_STARTUP_TIMEOUT)
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        self._server, self._failure, self._thread = None, [], None
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return  # a real server is configured, or Prefect will refuse by itself
        from prefect.server.api.server import SubprocessASGIServer

        self._server = SubprocessASGIServer()
        self._thread = threading.Thread(target=self._start, name="eightgen-embedded-server", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._server.start()
        except Exception as exc:  # wait() reports it as one line
            self._failure.append(exc)

    def wait(self) -> None:
        """Block until the server answers; EightgenError saying what to do if it did not start."""
        if self._thread is None:
            return
        self._thread.join()
        if self._failure:
            self.discard()
            raise EightgenError(
                f"Prefect's embedded server did not start within {os.environ[STARTUP_TIMEOUT]} s (a busy machine?): "
                f"run again, raise {STARTUP_TIMEOUT}, or start `prefect server start` and set PREFECT_API_URL"
            )

    def discard(self) -> None:
        """Stop the server quietly (an error line should stay the only line)."""
        if self._server is None:
            return
        logging.getLogger("prefect").addFilter(_not_about_the_temporary_server)
        self._thread.join(timeout=1.0)
        self._server.stop()
