"""The process environment a command sets before torch and prefect load: offline Prefect, sleeping OpenMP threads."""

from __future__ import annotations

import os
from pathlib import Path


def process_env(cache_dir: Path) -> None:
    """Defaults for what the user has not set: no Prefect analytics, results under cache_dir, passive OpenMP."""
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, busy-waiting threads
    # starve each other (PGD training ran about four times slower). Read once, when torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str((cache_dir / "prefect-results").resolve()))
