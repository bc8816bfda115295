"""Stage task of the diffusion experiment: unguided samples from many noise seeds, for the one-in-ten sanity check.

Whether unguided samples are the target about one time in ten is told on its own count of noise seeds
(DiffusionConfig.unguided_seeds; the paths' noise starts are the first of them). torch and the sampler load inside the task body.
"""

from __future__ import annotations

import math
from pathlib import Path

from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, staged_dir, verified, write_manifest
from tasks.caching import STAGE_KEY, CachedStage, produced_by

SANITY = CachedStage("samples")


def n_sanity_chunks(seeds: int, chunk_size: int) -> int:
    """How many tasks the sanity samples of `seeds` noise seeds fan out to."""
    return math.ceil(seeds / chunk_size)


@task(name="sample-noise-chunk", **SANITY.options)
def sample_noise_chunk(
    seeds: int, steps: int, chunk_size: int, chunk: int, denoiser: Artifact, watch: Artifact, device: str, cache_dir: Path, force: bool = False
) -> Artifact:
    """Unguided DDIM samples from the uniform-noise starts of seeds chunk·chunk_size .. (the paths' first seeds among them)."""
    out, key = SANITY.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    import pandas as pd
    import torch

    from eightgen.data.starts import noise_image
    from eightgen.devices import pick_device
    from eightgen.diffusion.denoiser import load_denoiser
    from eightgen.diffusion.samples import sample_starts, write_samples
    from eightgen.models.detector import load_classifier

    dev = pick_device(device)
    net, schedule = load_denoiser(verified(denoiser), dev)
    detector, _ = load_classifier(verified(watch), dev)
    chosen = list(range(chunk * chunk_size, min(seeds, (chunk + 1) * chunk_size)))
    x0 = torch.stack([noise_image(s, "uniform", 1, torch.zeros(1), torch.ones(1)) for s in chosen])
    meta = pd.DataFrame({"run_id": [f"noise-s{s:04d}" for s in chosen], "start_kind": "noise", "start_digit": -1, "seed": chosen})
    samples = sample_starts(net, schedule, x0, meta, guide=None, watch=detector, steps=steps, level=1.0, record_every=steps, device=dev)
    get_run_logger().info("sanity samples, chunk %d: %d unguided samples from noise", chunk, len(chosen))
    with staged_dir(out) as tmp:
        write_samples(tmp, samples)
        write_manifest(tmp, {"kind": "sanity-samples", "chunk": chunk, STAGE_KEY: key}, ["samples.npz"])
    return artifact_of(out)
