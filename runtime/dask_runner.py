"""Prefect's Dask task runner, with torch pinned to each worker's thread count."""

from __future__ import annotations

import copyreg
import importlib
import os
import pickle
import sys
from typing import Any

from distributed import Worker
from distributed.diagnostics.plugin import WorkerPlugin
from prefect import Task
from prefect_dask import DaskTaskRunner
from prefect_dask.client import PrefectDaskClient

from prefect_api.records import flush_workers


def _import_task(module: str, name: str) -> Task:
    """The task object `name` of an importable module."""
    return getattr(importlib.import_module(module), name)


def _reduce_task(task: Task) -> tuple:
    """Pickle a module-level task by reference, so workers run the installed code with its source.

    By value (cloudpickle's default for a Task) the function arrives without a source file, and the
    stage cache keys, which hash the task's source, cannot be computed on the worker.
    """
    module, name = task.fn.__module__, task.fn.__name__
    if module != "__main__" and getattr(sys.modules.get(module), name, None) is task:
        return _import_task, (module, name)
    return task.__reduce_ex__(pickle.DEFAULT_PROTOCOL)


copyreg.pickle(Task, _reduce_task)


class TorchThreads(WorkerPlugin):
    """Give torch as many threads as its Dask worker has, so N workers on N cores do not oversubscribe."""

    idempotent = True
    name = "eightgen-torch-threads"

    def setup(self, worker: Worker) -> None:
        """Pin torch's intra-op thread pool to the worker's thread count."""
        import torch

        torch.set_num_threads(max(1, int(worker.state.nthreads)))


class TorchDaskTaskRunner(DaskTaskRunner):
    """DaskTaskRunner that registers TorchThreads on the cluster it connects to, and has every worker send its records
    before the flow run moves on (a worker on another host would otherwise report them after the API has stopped)."""

    def __exit__(self, *args: Any) -> None:
        if self._client is not None:
            try:
                self._client.run(flush_workers)  # on every worker: what it still buffers goes to the API now
            except Exception:  # noqa: BLE001 (a worker lost at the end: what it buffered is lost with it)
                pass
        super().__exit__(*args)

    @property
    def client(self) -> PrefectDaskClient:
        """The Dask client; the first access also registers the torch thread plugin."""
        fresh = self._client is None
        client = super().client
        if fresh:
            client.register_plugin(TorchThreads())
        return client


def dask_runner(address: str | None = None, workers: int | None = None, threads: int = 1) -> TorchDaskTaskRunner:
    """A Dask task runner on the scheduler at `address`, else on a new LocalCluster (one 1-thread worker per core)."""
    if address:
        return TorchDaskTaskRunner(address=address)
    return TorchDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers or os.cpu_count() or 1,
            "threads_per_worker": threads,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )
