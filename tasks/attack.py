"""Stage task: optimise one chunk of starts toward the target (content-addressed trajectories).

torch and the engine load inside the task body: a cached run never pays for them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from eightgen.artifacts import Artifact, artifact_of, read_manifest, staged_dir, verified
from eightgen.config import AttackConfig
from eightgen.data.grid import n_starts
from tasks.caching import STAGE_KEY, CachedStage, produced_by
from tasks.faults import fail_once, hold
from tasks.progress import meter

OPTIMIZE = CachedStage("attacks")


def pool_counts(dataset: Artifact) -> dict[int, int]:
    """The attack-start pool's images per digit, from the dataset artifact's manifest."""
    counts = read_manifest(dataset.path, verify=False).get("counts", {}).get("pool", {})
    return {int(d): int(n) for d, n in counts.items()}


def n_chunks(cfg: AttackConfig, dataset: Artifact) -> int:
    """How many chunk tasks an attack config fans out to on a dataset."""
    return math.ceil(n_starts(cfg, pool_counts(dataset)) / cfg.chunk_size)


@task(name="optimize-chunk", **OPTIMIZE.options)
def optimize_chunk(
    cfg: AttackConfig, model: Artifact, dataset: Artifact, chunk: int, cache_dir: Path, force: bool = False
) -> Artifact:
    """Push one chunk of starts toward the target; write its trajectories (content-addressed)."""
    fail_once()
    out, key = OPTIMIZE.here()
    if not force and produced_by(out, key):
        return artifact_of(out)
    from eightgen.attack.optimize import optimize
    from eightgen.chunks import write_chunk
    from eightgen.data.assembly import load_assembled
    from eightgen.data.starts import make_starts
    from eightgen.devices import pick_device
    from eightgen.models.detector import load_classifier

    device = pick_device(cfg.device)
    net, spec = load_classifier(verified(model), device)
    data = load_assembled(verified(dataset))
    rows = slice(chunk * cfg.chunk_size, (chunk + 1) * cfg.chunk_size)
    starts = make_starts(cfg, data.x_pool, data.y_pool, data.i_pool, spec.channels, net.mean.cpu(), net.std.cpu(), rows)
    x0, meta = starts.x0, starts.meta
    progress_id = create_progress_artifact(progress=0.0, description=f"optimisation, chunk {chunk}: {len(meta)} starts")
    every = max(1, cfg.steps // 20)
    log = get_run_logger().info

    started = time.perf_counter()
    with meter(f"chunk {chunk}", log, cfg.steps) as shown:

        def report(step: int) -> None:
            shown.update(step)
            if step % every == 0 or step == cfg.steps:
                update_progress_artifact(progress_id, 100.0 * step / cfg.steps)

        traj = optimize(net, x0.to(device), cfg, progress=report)
    seconds = time.perf_counter() - started
    log(
        "chunk %d: %d starts x %d steps on %s in %.1f s (%.0f image-steps/s)",
        chunk, len(meta), cfg.steps, device, seconds, len(meta) * cfg.steps / max(seconds, 1e-9),
    )
    with staged_dir(out) as tmp:
        info = {"chunk": chunk, "device": str(device), "seconds": seconds, "model": spec.arch, STAGE_KEY: key}
        write_chunk(tmp, traj, x0.numpy(), meta, info)
        hold(chunk)  # a fault rehearsal can stop here: the chunk written, not yet published
    return artifact_of(out)
