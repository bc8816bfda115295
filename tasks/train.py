"""Stage task: assembled dataset -> trained target-detector artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, verified
from eightgen.config import TrainConfig
from tasks.caching import STAGE_KEY, CachedStage, produced_by
from tasks.progress import meter

TRAIN = CachedStage("models")


@task(name="train-classifier", **TRAIN.options)
def train_classifier(cfg: TrainConfig, dataset: Artifact, cache_dir: Path, force: bool = False) -> Artifact:
    """Train the target detector on the assembled dataset; return its exported model."""
    out, key = TRAIN.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    from eightgen.models.training import train  # fastai loads only when a detector is trained

    log = get_run_logger().info
    epochs = cfg.epochs + int(cfg.fine_tune)
    with meter("training", log, unit="batches") as shown:

        def batches(done: int, total: int) -> None:
            shown.update(done, total, detail=f"epoch {min(epochs, (done - 1) * epochs // total + 1)}/{epochs}")

        return train(cfg, verified(dataset), out, progress=log, batches=batches, stamp={STAGE_KEY: key})
