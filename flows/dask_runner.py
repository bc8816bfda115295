"""Prefect's Dask task runner, with torch pinned to each worker's thread count."""

from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner
from prefect_dask.client import PrefectDaskClient


class TorchThreads(WorkerPlugin):
    """Give torch as many threads as its Dask worker has, so N workers on N cores do not oversubscribe."""

    idempotent = True
    name = "eightgen-torch-threads"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        """Pin torch's intra-op thread pool to the worker's thread count."""
        import torch

        torch.set_num_threads(max(1, int(worker.state.nthreads)))


class TorchDaskTaskRunner(DaskTaskRunner):
    """DaskTaskRunner that registers TorchThreads on the cluster it connects to."""

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
