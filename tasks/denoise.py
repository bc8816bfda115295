"""Stage tasks of the diffusion experiment: train the denoiser (content-addressed), sample one chunk of starts along one
path (content-addressed), and find the aligned experiment's gradient runs it is compared with.

torch, fastai and the sampler load inside the task bodies: a cached run never pays for them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, staged_dir, stamp_manifest, verified, write_manifest, write_timings
from eightgen.config import AlignedConfig, AttackConfig, DenoiserConfig
from eightgen.errors import EightgenError
from tasks.caching import STAGE_KEY, CachedStage, produced_by
from tasks.progress import meter

DENOISER = CachedStage("denoisers")
SAMPLE = CachedStage("samples")


def n_samples(cfg: AttackConfig) -> int:
    """How many starts an attack config asks for: its noise seeds and its starts per start digit (a number)."""
    if not isinstance(cfg.per_digit, int):
        raise EightgenError(f"starts per digit must be a number here, got {cfg.per_digit!r}")
    return len(cfg.start_digits or ()) * cfg.per_digit + int(cfg.include_noise) * cfg.seeds


def n_sample_chunks(cfg: AttackConfig, chunk_size: int) -> int:
    """How many sampling tasks the starts fan out to."""
    return math.ceil(n_samples(cfg) / chunk_size)


@task(name="train-denoiser", **DENOISER.options)
def train_denoiser_model(cfg: DenoiserConfig, dataset: Artifact, cache_dir: Path, force: bool = False) -> Artifact:
    """Train the U-Net denoiser on the dataset's training split with fastai; return its artifact."""
    out, key = DENOISER.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    from eightgen.devices import pick_device
    from eightgen.diffusion.denoiser import train_denoiser

    log = get_run_logger().info
    with meter("denoiser training", log, unit="batches") as shown:

        def batches(done: int, total: int) -> None:
            shown.update(done, total)

        with staged_dir(out) as tmp:
            train_denoiser(cfg, verified(dataset), tmp, pick_device(cfg.device), progress=log, batches=batches)
            stamp_manifest(tmp, {STAGE_KEY: key})
    return artifact_of(out)


@task(name="sample-chunk", **SAMPLE.options)
def sample_chunk(
    attack: AttackConfig,
    guidance: str,
    scale: float,
    steps: int,
    level: float,
    record_every: int,
    chunk_size: int,
    chunk: int,
    denoiser: Artifact,
    detectors: dict[str, Artifact],
    dataset: Artifact,
    device: str,
    cache_dir: Path,
    force: bool = False,
) -> Artifact:
    """DDIM-sample one chunk of the aligned starts, guided by detectors[guidance] (or not: "none"); p(target) is
    recorded under the robust detector on every path."""
    out, key = SAMPLE.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    from eightgen.data.assembly import load_assembled
    from eightgen.data.starts import make_starts
    from eightgen.devices import pick_device
    from eightgen.diffusion.denoiser import load_denoiser
    from eightgen.diffusion.sampler import Guide
    from eightgen.diffusion.samples import sample_starts, write_samples
    from eightgen.models.detector import load_classifier

    if guidance != "none" and guidance not in detectors:
        raise EightgenError(f"guidance {guidance!r}: no such detector (have {', '.join(sorted(detectors))})")
    dev = pick_device(device)
    net, schedule = load_denoiser(verified(denoiser), dev)
    watch, spec = load_classifier(verified(detectors["robust"]), dev)
    guide = None if guidance == "none" else Guide(load_classifier(verified(detectors[guidance]), dev)[0], scale)
    data = load_assembled(verified(dataset))
    starts = make_starts(attack, data.x_pool, data.y_pool, data.i_pool, spec.channels, watch.mean.cpu(), watch.std.cpu())
    rows = slice(chunk * chunk_size, (chunk + 1) * chunk_size)
    x0, meta = starts.x0[rows], starts.meta.iloc[rows].reset_index(drop=True)
    log = get_run_logger().info
    started = time.perf_counter()
    with meter(f"sampling {guidance}, chunk {chunk}", log, steps) as shown:
        samples = sample_starts(
            net, schedule, x0, meta, guide=guide, watch=watch, steps=steps, level=level, record_every=record_every, device=dev,
            progress=lambda done, total: shown.update(done, total),
        )
    seconds = time.perf_counter() - started
    log("sampling %s, chunk %d: %d starts on %s in %.1f s", guidance, chunk, len(meta), dev, seconds)
    with staged_dir(out) as tmp:
        write_samples(tmp, samples)
        write_manifest(tmp, {"kind": "samples", "guidance": guidance, "chunk": chunk, STAGE_KEY: key}, ["samples.npz"])
        write_timings(tmp, {"seconds": round(seconds, 3)})
    return artifact_of(out)


@task(name="find-gradient-runs")
def gradient_runs(cfg: AlignedConfig) -> dict[str, Artifact]:
    """The aligned experiment's verified run directories at its matched budget by detector, and what they used:
    "dataset", "referees", "model-<detector>"."""
    from eightgen.rundir import load_record, verify_run

    found: dict[str, Artifact] = {}
    for name in cfg.detectors:
        run_dir = cfg.experiment(name, cfg.matched_budget).run_dir
        found[name] = verify_run(run_dir)
        record = load_record(run_dir)
        found[f"model-{name}"] = record.model.artifact()
        found["dataset"] = record.dataset.artifact()
        if record.referees is None:
            raise EightgenError(f"{run_dir}: no referees in its record; not a judged aligned run")
        found["referees"] = Artifact(path=record.referees.path, sha256=record.referees.sha256)
    return found
