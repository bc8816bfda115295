"""One lifecycle for every command that runs a flow (run, aligned, diffusion): the checks run while the local Prefect
server boots, the flow runs under a stopper (Ctrl-C, SIGTERM or a lost server end it in seconds with one line), its
records are settled, and its result comes back or fails in one line."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from runtime.stopping import KEPT, Stopper


def run_flow(what: str, prepare: Callable[[], None], start: Callable[[], Any]) -> Any:
    """Start or reuse the local server, run `prepare` (the checks) while it boots, then `start` (the flow, called with
    return_state=True) under a stopper; settle the flow run's records and return its result (EightgenError if it failed)."""
    from prefect_api.server import check_api
    from runtime.embedded import EmbeddedServer

    check_api(required=False)
    server = EmbeddedServer()  # boots while the checks run; kept for the next command
    try:
        prepare()
        from prefect import tags

        from prefect_api.records import mark_stopped, outcome, settle

        # Every flow and task run of this command carries the tag, so a stopped command can find and mark them.
        tag = f"command-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with server.wait():
            stopper = Stopper(
                mark=lambda reason: mark_stopped(tag, reason),
                release=server.give_back,
                health=server.health if server.pid is not None else None,
                lost_line=f"eightgen: error: Prefect's local API server stopped answering (its log: {server.log}); {KEPT}",
            )
            with stopper, tags(tag):
                state = start()
            settle(state.state_details.flow_run_id, server.outlives_command)
    finally:
        server.stop()
    return outcome(state, what)
