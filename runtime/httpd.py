"""Serve the runs folder over http on 127.0.0.1, so report links work in the Prefect UI (it drops file:// links)."""

from __future__ import annotations

import errno
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from eightgen.errors import EightgenError
from eightgen.rundir import REPORT

# Set by `eightgen serve` for the flow runs it starts; read where a report link is published.
REPORTS_URL = "EIGHTGEN_REPORTS_URL"
REPORTS_ROOT = "EIGHTGEN_REPORTS_ROOT"


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files, without one stderr line per request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class ReportServer:
    """A threaded static http server for one folder, on 127.0.0.1, in a daemon thread."""

    def __init__(self, root: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._httpd = ThreadingHTTPServer((host, port), partial(_QuietHandler, directory=str(self.root)))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise EightgenError(f"cannot serve reports on {host}:{port} ({why}); pick another --reports-port") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="eightgen-reports", daemon=True)

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:4201."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ReportServer":
        """Start answering requests; also export the URL and root for flow runs started from here."""
        self._thread.start()
        os.environ[REPORTS_URL], os.environ[REPORTS_ROOT] = self.url, str(self.root)
        return self

    def stop(self) -> None:
        """Stop answering (if started) and free the port."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "ReportServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def report_link(run_dir: Path, page: str = REPORT) -> str | None:
    """The http:// URL of run_dir/page (report.html) when a report server publishes the folder holding it, else None."""
    base, root = os.environ.get(REPORTS_URL), os.environ.get(REPORTS_ROOT)
    if not base or not root:
        return None
    try:
        relative = Path(run_dir).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    return f"{base.rstrip('/')}/{quote(relative.as_posix())}/{page}"
