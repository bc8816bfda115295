"""A tiny real pipeline config for the serving, retry and Dask tests, sharing one cache per test session.

Every config here has the same dataset and training settings as `eightgen run TINY`, and one cache
dir, so the 8-detector is trained once per session and comes back Cached everywhere else.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eightgen.config import ExperimentConfig
from cli.main import build_config, parser

# 2 start digits + noise, 2 seeds each, 2 starts per chunk -> 3 optimisation chunks.
TINY = ["--preset", "quick", "--seeds", "2", "--digits", "1,3", "--steps", "5", "--epochs", "1", "--max-train", "2000", "--chunk-size", "2"]


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache dir for tiny runs (its Prefect result records live in prefect-results/ inside)."""
    path = tmp_path_factory.getbasetemp() / "tiny-cache"
    path.mkdir(exist_ok=True)
    return path


def tiny_config(mnist_dir: Path, cache_dir: Path, runs_root: Path, *options: str) -> ExperimentConfig:
    """The config `eightgen run TINY --mnist-dir ... <options>` builds (options override TINY)."""
    argv = ["run", *TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--runs-root", str(runs_root), *options]
    return build_config(parser().parse_args(argv))
