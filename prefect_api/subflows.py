"""How the stage flows run inside a parent flow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@contextmanager
def nested_stages() -> Iterator[None]:
    """Subflows started in here send no heartbeats of their own.

    A subflow runs in its parent's process, whose heartbeat already says that process is alive; each subflow's
    own heartbeat thread sleeps in one-second slices and is joined when the subflow ends, which cost a cached
    pipeline about 0.8 s per stage.
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
