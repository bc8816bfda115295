"""The process runtime/embedded.py starts: Prefect's API app under uvicorn, stopping once no command has used it a while.

    python -m runtime.prefect_server --port PORT --home PREFECT_HOME --idle SECONDS
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path

from runtime.embedded import STATE, lease_dir, live_leases, locked, recorded

POLL_SECONDS = 1.0


def watch(server, home: Path, idle: float) -> None:
    """Ask uvicorn to exit once no live command has held a lease on it for `idle` seconds, or at once when none
    does and another server has taken its place."""
    leases, quiet_since = lease_dir(home, os.getpid()), None
    while not server.should_exit:
        time.sleep(POLL_SECONDS)
        with locked(home):  # a command starting now either sees this server's state or none at all
            if live_leases(leases):
                quiet_since = None
                continue
            quiet_since = quiet_since or time.monotonic()
            state = recorded(home)
            superseded = state is not None and state["pid"] != os.getpid()
            if superseded or time.monotonic() - quiet_since >= idle:
                if not superseded:
                    (home / STATE).unlink(missing_ok=True)
                shutil.rmtree(leases, ignore_errors=True)
                server.should_exit = True


def main() -> None:
    """Serve Prefect's API on 127.0.0.1:PORT until idle."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m runtime.prefect_server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--idle", type=float, required=True)
    args = p.parse_args()
    config = uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=args.port, log_level="error", lifespan="on"
    )
    server = uvicorn.Server(config)
    threading.Thread(target=watch, args=(server, args.home, args.idle), daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
