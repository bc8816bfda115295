"""Stage task of the diffusion experiment: judge every path's results on identical starts and write the
"three ways" report (diffusion.html, diffusion.json, results.parquet, images.npz, trajectories.npz) as one directory.

torch and the referees load inside the task body: a cached run never pays for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from eightgen.artifacts import Artifact, artifact_of, check_unchanged, read_timings, staged_dir, verified, write_manifest
from eightgen.config import DiffusionConfig
from eightgen.errors import EightgenError
from reports.aligned import load_aligned_run
from reports.diffusion import render_diffusion
from reports.files import DIFFUSION_HTML, DIFFUSION_JSON
from tasks.caching import STAGE_KEY, CachedStage

THREE_WAYS = CachedStage(None)
RESULTS = "results.parquet"
IMAGES = "images.npz"  # run_id, x0 and every path's final images, in one start order
TRAJECTORIES = "trajectories.npz"  # per diffusion path: x̂₀ snapshots and the robust detector's p(target) per DDIM step
START_ATOL = 2e-3  # the gradient runs keep their starts as float16 snapshots


def _order(run_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row indices that put run_ids in the order of `wanted` (EightgenError if a start is missing)."""
    where = {r: i for i, r in enumerate(run_ids)}
    missing = [r for r in wanted if r not in where]
    if missing:
        raise EightgenError(f"{what}: no result for start {missing[0]} (not the same starts)")
    return np.array([where[r] for r in wanted], dtype=np.int64)


@task(name="judge-three-ways", **THREE_WAYS.options)
def judge_three_ways(
    cfg: DiffusionConfig,
    runs: dict[str, Artifact],
    samples: dict[str, list[Artifact]],
    denoiser: Artifact,
    sanity: list[Artifact],
    run_dir: Path,
    force: bool = False,
) -> Artifact:
    """Judge the gradient runs and the diffusion samples with the referees on identical starts, and the unguided
    sanity samples from many noise seeds; check the judges on real held-out images; write the report.

    The real images of the Fréchet samples and of the judges' check are the dataset's validation split: training-split
    images that no referee, detector or denoiser trained on."""
    from eightgen.data.assembly import load_assembled
    from eightgen.devices import pick_device
    from eightgen.diffusion.denoiser import load_denoiser, read_denoiser_info
    from eightgen.diffusion.samples import concat_samples, read_samples
    from eightgen.judge.frechet import frechet_distance
    from eightgen.judge.judgecheck import VARIANTS, blurred, judge_classes, per_class, round_trip
    from eightgen.judge.referees import load_referees
    from eightgen.judge.threeways import frechet_samples, image_features, judge_images, path_diversity

    _, key = THREE_WAYS.here()
    target = cfg.target
    device = pick_device(cfg.device)
    refs = load_referees(verified(runs["referees"]), device)
    data = load_assembled(verified(runs["dataset"]))
    real_x, real_y = np.asarray(data.x_valid, np.uint8), np.asarray(data.y_valid, np.int64)
    grad = {}
    for name in ("standard", "robust"):
        run = load_aligned_run(runs[name].path)
        check_unchanged(runs[name], run.run.sha256)
        grad[name] = run
    base = grad["standard"].results
    run_ids = np.array(base["run_id"].astype(str).tolist(), dtype=str)
    meta = base[["run_id", "start_kind", "start_digit", "seed"]].reset_index(drop=True)
    start_digit = meta["start_digit"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    x0 = grad["standard"].x0.mean(axis=1, keepdims=True)
    images: dict[str, np.ndarray] = {}
    for name, run in grad.items():
        rows = _order(run.results["run_id"].astype(str).to_numpy(), run_ids, f"{name} gradient run")
        images[f"{name}-gradient"] = run.x_final[rows].mean(axis=1, keepdims=True)
    trajectories: dict[str, dict] = {}
    for guidance, chunks in samples.items():
        s = concat_samples([read_samples(verified(a)) for a in chunks])
        rows = _order(s.meta["run_id"].astype(str).to_numpy(), run_ids, f"diffusion ({guidance}) samples")
        if not np.allclose(s.x0[rows], x0, atol=START_ATOL):
            raise EightgenError(f"diffusion ({guidance}) samples do not start from the gradient runs' starts")
        path = f"diffusion-{guidance}"
        images[path] = s.x_final[rows]
        trajectories[path] = {
            "run_id": run_ids, "start_kind": meta["start_kind"].astype(str).to_numpy(), "snapshot_steps": s.snapshot_steps,
            "snapshots": s.snapshots[rows], "p_target": s.p_target[rows],
        }
    frames, measures = [], {}
    kinds = meta["start_kind"].astype(str).to_numpy()
    plan = frechet_samples(kinds, real_y, target, cfg.frechet_n)
    reference = image_features(refs, real_x[plan.reference])
    for path, x in images.items():
        judged = judge_images(refs, x, x0, start_digit, target)
        frames.append(pd.concat([meta.assign(path=path), judged], axis=1))
        measures[path] = {
            kind: {"frechet": frechet_distance(image_features(refs, x[rows]), reference), "diversity": path_diversity(x[kinds == kind], start_digit[kinds == kind])}
            for kind, rows in plan.starts.items()
        }
    where = lambda rows: {"split": data.s_valid[rows].tolist(), "index": data.i_valid[rows].tolist()}  # noqa: E731  MNIST images
    frechet = {
        "n": plan.n, "seed": plan.seed, "features": "robust referee, penultimate layer", "real": "validation split",
        "floor": frechet_distance(image_features(refs, real_x[plan.floor]), reference),
        "ceiling": frechet_distance(image_features(refs, real_x[plan.ceiling]), reference),
        "reference_images": where(plan.reference), "floor_images": where(plan.floor), "ceiling_images": where(plan.ceiling),
        "ceiling_classes": np.bincount(real_y[plan.ceiling], minlength=10).tolist(),
        "starts": {kind: run_ids[rows].tolist() for kind, rows in plan.starts.items()},
    }
    net, schedule = load_denoiser(verified(denoiser), device)
    chosen = per_class(real_y, cfg.check_per_class)
    shown = real_x[chosen].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    variants = dict(zip(VARIANTS, (shown, blurred(shown, cfg.check_blur), round_trip(net, schedule, shown, cfg.check_level, cfg.ddim_steps, device))))
    check = {
        "y": real_y[chosen], "calls": {v: judge_classes(refs, x) for v, x in variants.items()}, "level": cfg.check_level, "blur": cfg.check_blur,
        "images": where(chosen), "examples": {v: x[per_class(real_y[chosen], 1)] for v, x in variants.items()},
    }
    results = pd.concat(frames, ignore_index=True)
    checked = None
    if sanity:
        s = concat_samples([read_samples(verified(a)) for a in sanity])
        checked = judge_images(refs, s.x_final, s.x0, np.full(len(s), -1, dtype=np.int64), target)
        checked = checked.assign(**{f"{judge}_class": c for judge, c in judge_classes(refs, s.x_final).items()})
    info = read_denoiser_info(verified(denoiser))
    record = grad["robust"].record
    facts = {
        "budget": cfg.aligned.matched_budget, "attack_steps": cfg.aligned.attack.steps, "denoiser": info,
        "ddim_steps": cfg.ddim_steps, "start_level": cfg.start_level, "guidance_scale": cfg.guidance_scale,
        "knn_k": int(refs.k), "detectors": {n: r.record.model.sha256[:12] for n, r in grad.items()},
        "sampling_seconds": {g: sum(float(read_timings(a.path).get("seconds", 0.0)) for a in chunks) for g, chunks in samples.items()},
        "dataset": record.dataset.sha256[:12],
    }
    with staged_dir(run_dir) as tmp:
        summary = render_diffusion(
            tmp, results=results, measures=measures, images=images, x0=x0, run_ids=run_ids, trajectories=trajectories,
            facts=facts, target=target, classes=cfg.aligned.dataset.classes, grid_seeds=cfg.grid_seeds, sanity=checked,
            frechet=frechet, check=check,
        )
        results.to_parquet(tmp / RESULTS, index=False)
        np.savez_compressed(tmp / IMAGES, run_id=run_ids, x0=x0, **{p.replace("-", "_"): x for p, x in images.items()})
        steps = {}
        for path, t in trajectories.items():
            name = path.replace("-", "_")
            steps |= {f"{name}_snapshot_steps": t["snapshot_steps"], f"{name}_snapshots": t["snapshots"], f"{name}_p_target": t["p_target"]}
        np.savez_compressed(tmp / TRAJECTORIES, run_id=run_ids, **steps)
        files = [DIFFUSION_HTML, DIFFUSION_JSON, RESULTS, IMAGES, TRAJECTORIES]
        write_manifest(tmp, {"kind": "diffusion", "targets_met": summary["targets_met"], STAGE_KEY: key}, files)
    get_run_logger().info("three ways: targets %s", "met" if summary["targets_met"] else "missed")
    return artifact_of(run_dir)
