"""The process environment a command sets before torch and prefect load: offline Prefect, sleeping OpenMP threads, and
where Prefect keeps its result records (under the cache: a folder, or a store URL through a RemoteFileSystem block)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from eightgen.store import is_url, local

RECORDS = "prefect-results"  # <cache_dir>/prefect-results: the stage tasks' result records
STORAGE_BLOCK = "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"


def records_block(cache_dir: Path) -> str:
    """The slug of the RemoteFileSystem block that keeps a store cache's result records (named for its URL)."""
    return f"remote-file-system/eightgen-records-{hashlib.sha256(str(cache_dir).encode()).hexdigest()[:12]}"


def process_env(cache_dir: Path) -> None:
    """Defaults for what the user has not set: no Prefect analytics, results under cache_dir, passive OpenMP."""
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, busy-waiting threads
    # starve each other (PGD training ran about four times slower). Read once, when torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if is_url(cache_dir):  # the block is saved once the API answers (save_records_block); Dask workers load it there
        os.environ.setdefault(STORAGE_BLOCK, records_block(cache_dir))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str((local(cache_dir) / RECORDS).resolve()))


def save_records_block(cache_dir: Path) -> None:
    """With a store cache: save the RemoteFileSystem block of process_env's name, at <cache_dir>/prefect-results."""
    slug = records_block(cache_dir)
    if not is_url(cache_dir) or os.environ.get(STORAGE_BLOCK) != slug:  # a block the user named is theirs to keep
        return
    from prefect.filesystems import RemoteFileSystem

    RemoteFileSystem(basepath=str(cache_dir / RECORDS)).save(slug.split("/", 1)[1], overwrite=True)
