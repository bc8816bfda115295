"""Stage task: assembled dataset (its referee split) -> trained referees artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, staged_dir, stamp_manifest, verified
from eightgen.config import RefereeConfig
from tasks.caching import STAGE_KEY, CachedStage, produced_by

REFEREES = CachedStage("referees")


@task(name="train-referees", **REFEREES.options)
def train_referee_models(cfg: RefereeConfig, dataset: Artifact, cache_dir: Path, force: bool = False) -> Artifact:
    """Train the standard and robust 10-class referees and store the k-NN references (content-addressed)."""
    out, key = REFEREES.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    from eightgen.data.assembly import load_assembled
    from eightgen.devices import pick_device
    from eightgen.judge.referees import train_referees  # fastai loads only when the referees are trained

    with staged_dir(out) as tmp:
        train_referees(cfg, load_assembled(verified(dataset)), tmp, pick_device(cfg.device), progress=get_run_logger().info)
        stamp_manifest(tmp, {STAGE_KEY: key})
    return artifact_of(out)
