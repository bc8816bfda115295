"""Stage task: assembled dataset (its referee split) -> trained referees artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, staged_dir, verified
from eightgen.assembly import load_assembled
from eightgen.config import RefereeConfig
from eightgen.devices import pick_device
from eightgen.referees import train_referees
from tasks.caching import CachedStage, output_is_valid

REFEREES = CachedStage("referees", ("eightgen.models", "eightgen.training", "eightgen.robust", "eightgen.referees"))


@task(name="train-referees", **REFEREES.options)
def train_referee_models(cfg: RefereeConfig, dataset: Artifact, cache_dir: Path, force: bool = False) -> Artifact:
    """Train the standard and robust 10-class referees and store the k-NN references (content-addressed)."""
    out = REFEREES.here()
    if not force and output_is_valid(out):
        return artifact_of(out)
    with staged_dir(out) as tmp:
        train_referees(cfg, load_assembled(verified(dataset)), tmp, pick_device(cfg.device), progress=get_run_logger().info)
    return artifact_of(out)
