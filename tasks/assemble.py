"""Stage task: data source -> assembled target-vs-rest dataset artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from eightgen.artifacts import Artifact, artifact_of, staged_dir, stamp_manifest
from eightgen.config import DatasetConfig
from eightgen.data.assembly import assemble, save_assembled
from eightgen.data.sources import load_mnist, source_fingerprint
from tasks.caching import STAGE_KEY, CachedStage, produced_by
from tasks.faults import hold

ASSEMBLE = CachedStage("datasets")


@task(name="fingerprint-source")
def fingerprint_source(cfg: DatasetConfig) -> dict:
    """Identify the dataset source's content (file hashes, or the Hub name) for the cache key."""
    return source_fingerprint(cfg)


@task(name="assemble-dataset", **ASSEMBLE.options)
def assemble_dataset(cfg: DatasetConfig, source: dict, cache_dir: Path, force: bool = False) -> Artifact:
    """Load MNIST from its source and write the assembled dataset artifact (content-addressed)."""
    out, key = ASSEMBLE.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    with staged_dir(out) as tmp:
        save_assembled(assemble(load_mnist(cfg), cfg), tmp)
        hold()
        stamp_manifest(tmp, {STAGE_KEY: key})
    return artifact_of(out)
