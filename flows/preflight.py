"""Checks that run before any flow starts, so bad input fails in seconds with one line."""

from __future__ import annotations

from eightgen.assembly import assemble
from eightgen.config import ExperimentConfig
from eightgen.devices import pick_device
from eightgen.errors import EightgenError
from eightgen.rundir import check_target
from eightgen.sources import load_mnist


def preflight(cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Check the run directory, load and cut the data, and check the devices, raising EightgenError on the first problem."""
    check_target(cfg.run_dir, cfg, overwrite)
    pick_device(cfg.train.device)
    pick_device(cfg.attack.device)
    assembled = assemble(load_mnist(cfg.dataset), cfg.dataset)
    per_digit = min((assembled.y_pool == d).sum() for d in cfg.attack.start_digits) if cfg.attack.start_digits else None
    if per_digit is not None and per_digit < cfg.attack.seeds:
        raise EightgenError(
            f"attack.seeds={cfg.attack.seeds} needs that many pool images per start digit; "
            f"dataset.pool_per_digit gives {per_digit}"
        )
