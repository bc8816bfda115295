"""Serve the runs folder over http on 127.0.0.1, so report links work in the Prefect UI (it drops file:// links)."""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from eightgen.errors import EightgenError
from eightgen.rundir import REPORT
from eightgen.store import is_url

# Set by `eightgen serve` for the flow runs it starts; read where a report link is published.
REPORTS_URL = "EIGHTGEN_REPORTS_URL"
REPORTS_ROOT = "EIGHTGEN_REPORTS_ROOT"
LINK_DAYS = 7  # how long a presigned report link of a run in a store stays valid (S3's longest)


@dataclass(frozen=True)
class Pages:
    """The pages the server makes besides static files (given by the command, which may import the reports)."""

    index: Callable[[Path], Path]  # (runs root) -> index.html, written
    compare: Callable[[Path, Sequence[str]], Path]  # (runs root, run names) -> comparison report, written under root


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files, without one stderr line per request; /compare?run=a&run=b renders a comparison and redirects to it."""

    def __init__(self, *args: object, pages: Pages | None = None, **kwargs: object) -> None:
        self.pages = pages
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.rstrip("/") != "/compare":
            return super().do_GET()
        if self.pages is None:
            return self._one_line(HTTPStatus.NOT_FOUND, "this server makes no comparisons")
        names = parse_qs(url.query).get("run", [])
        root = Path(self.directory)
        try:
            page = self.pages.compare(root, names)  # checks the names: run directories directly under root only
            where = "/" + quote(page.resolve().relative_to(root.resolve()).as_posix())
        except (EightgenError, ValueError) as exc:
            return self._one_line(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # noqa: BLE001  one line for the browser; the server keeps serving
            return self._one_line(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _one_line(self, status: HTTPStatus, text: str) -> None:
        body = (" ".join(text.split()) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ReportServer:
    """A threaded static http server for one folder, on 127.0.0.1, in a daemon thread."""

    def __init__(self, root: Path, port: int = 0, host: str = "127.0.0.1", pages: Pages | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.pages = pages
        try:
            self._httpd = ThreadingHTTPServer((host, port), partial(_QuietHandler, directory=str(self.root), pages=pages))
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
        """Write the runs index, start answering requests; also export the URL and root for flow runs started from here."""
        if self.pages is not None:
            try:
                self.pages.index(self.root)
            except Exception as exc:  # noqa: BLE001  the reports are served without an index rather than not at all
                print(f"eightgen: warning: runs index of {self.root} not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
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
    """The http:// URL of run_dir/page (report.html) when a report server publishes the folder holding it, else None.

    A run in a store gets a presigned URL of the page, valid for LINK_DAYS days, where the store can sign one."""
    if is_url(run_dir):
        try:
            return run_dir.fs.sign(f"{run_dir.path.rstrip('/')}/{page}", expiration=LINK_DAYS * 86400)
        except NotImplementedError:
            return None
    base, root = os.environ.get(REPORTS_URL), os.environ.get(REPORTS_ROOT)
    if not base or not root:
        return None
    try:
        relative = Path(run_dir).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    return f"{base.rstrip('/')}/{quote(relative.as_posix())}/{page}"
