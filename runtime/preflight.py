"""Checks that run before any flow starts, so bad input fails in seconds with one line."""

from __future__ import annotations

import os
from pathlib import Path

from eightgen.assembly import assemble
from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.rundir import check_target
from eightgen.sources import load_mnist


def writable_dir(path: Path, option: str) -> None:
    """EightgenError unless `path` is a folder, or can be made one, that this user may write into."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EightgenError(f"{option} {path}: {existing} is a file, not a folder; name a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EightgenError(f"{option} {path}: {existing} is not writable; name a folder you may write into")


def preflight(cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Check the folders and the run directory, load and cut the data, and check the devices, raising EightgenError on the first problem."""
    writable_dir(cfg.runs_root, "--runs-root")
    writable_dir(cfg.cache_dir, "--cache-dir")
    check_target(cfg.run_dir, cfg, overwrite)
    explicit = {cfg.train.device, cfg.attack.device} - {"auto", "cpu"}
    if explicit:  # only an asked-for accelerator can be missing; "auto" falls back to the CPU
        from eightgen.devices import pick_device

        for name in sorted(explicit):
            pick_device(name)
    assembled = assemble(load_mnist(cfg.dataset), cfg.dataset)
    per_digit = min((assembled.y_pool == d).sum() for d in cfg.attack.start_digits) if cfg.attack.start_digits else None
    if per_digit is not None and per_digit < cfg.attack.seeds:
        raise EightgenError(
            f"attack.seeds={cfg.attack.seeds} needs that many pool images per start digit; "
            f"dataset.pool_per_digit gives {per_digit}"
        )
