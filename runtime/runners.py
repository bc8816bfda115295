"""Where the attack chunks run: threads in this process, or Dask workers (checked before any flow starts)."""

from __future__ import annotations

from typing import Literal, get_args

from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import is_url

TaskRunnerKind = Literal["threads", "dask"]
TASK_RUNNERS: tuple[str, ...] = get_args(TaskRunnerKind)


def probe_dask(address: str, timeout: float = 5.0) -> int:
    """Connect to a Dask scheduler within `timeout` seconds; return its worker count, else EightgenError."""
    from distributed import Client

    try:
        with Client(address, timeout=f"{timeout}s", set_as_default=False) as client:
            workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EightgenError(f"no Dask scheduler reachable at {address!r} ({reason})") from None
    if workers == 0:
        raise EightgenError(f"the Dask scheduler at {address!r} has no workers")
    return workers


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with runs_root, cache_dir and local data paths absolute (for Dask workers and deployments)."""
    data = cfg.dataset
    dataset = data.model_copy(
        update={
            "mnist_dir": data.mnist_dir.resolve() if data.mnist_dir else None,
            "local_path": data.local_path.resolve() if data.local_path else None,
        }
    )
    where = {k: v if is_url(v) else v.resolve() for k, v in (("runs_root", cfg.runs_root), ("cache_dir", cfg.cache_dir))}
    return cfg.model_copy(update={**where, "dataset": dataset})
