"""Make sure the Prefect API has recorded every task run before the process exits, and read those records."""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker


def flush_workers() -> None:
    """Send buffered events (task-run states travel as events) and logs to the API now."""
    for worker in (EventsWorker, APILogWorker):
        try:
            worker.drain_all(timeout=30)
        except RuntimeError:
            pass


def flow_tree(client, root: UUID) -> list[UUID]:
    """The ids of a flow run and of all its nested subflow runs."""
    ids, frontier = [root], [root]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [c.id for c in children if c.id not in ids]
        ids += frontier
    return ids


def task_states_of(flow_run_ids: list[UUID]) -> dict[str, list[str]]:
    """Task-run name prefix -> state names, for the task runs of these flow runs (subflow stand-ins left out)."""
    with get_client(sync_client=True) as client:
        stand_ins = {client.read_flow_run(i).parent_task_run_id for i in flow_run_ids}
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=list(flow_run_ids))))
    states: dict[str, list[str]] = {}
    for r in runs:
        if r.id not in stand_ins:
            states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name if r.state else "none")
    return states


def task_run_states(flow_run_id: UUID) -> dict[str, list[str]]:
    """Task-run name prefix -> state names, for every task run of a flow-run tree (subflow stand-ins left out)."""
    with get_client(sync_client=True) as client:
        tree = flow_tree(client, flow_run_id)
    return task_states_of(tree)


def wait_for_records(flow_run_id: UUID, timeout: float = 60.0, settle_polls: int = 5) -> int:
    """Block until every task run of the flow-run tree is recorded in a final state; return the count."""
    flush_workers()
    deadline, last, stable = time.monotonic() + timeout, -1, 0
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=flow_tree(client, flow_run_id)))
            )
            final = all(r.state is not None and r.state.is_final() for r in runs)
            stable = stable + 1 if final and len(runs) == last else 0
            if stable >= settle_polls:
                return len(runs)
            last = len(runs)
            time.sleep(0.1)
    return last


def settle(flow_run_id: UUID, server_stays: bool) -> None:
    """Make a finished flow run's records durable: flush them to a server that stays up, or wait until one that
    stops with this command holds every record."""
    if server_stays:  # a running server records what it was sent after this process is gone
        flush_workers()
    else:
        wait_for_records(flow_run_id)


def outcome(state, what: str):
    """A finished flow run's result; its exception when it failed (an EightgenError stays one line), or an
    EightgenError naming `what` when it ended otherwise."""
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, Exception):
        raise exc
    from eightgen.errors import EightgenError

    raise EightgenError(f"{what} ended {state.name}")


UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def mark_stopped(tag: str, reason: str, timeout: float = 1.0) -> int:
    """Mark the unfinished flow runs tagged `tag` Cancelled and their unfinished task runs Crashed; the number marked."""
    from prefect.states import Cancelled, Crashed

    marked = 0
    with get_client(sync_client=True, httpx_settings={"timeout": timeout}) as client:
        unfinished = FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]), state=unfinished))
        for run in runs:
            client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
            marked += 1
        if runs:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in runs]}),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED))),
            )
            for t in tasks:
                client.set_task_run_state(t.id, Crashed(message=reason), force=True)
                marked += 1
    return marked
