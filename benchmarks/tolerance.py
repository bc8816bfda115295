"""How far the CUDA speed options move the engine's answers: success and flip steps under bf16 autocast and compile.

Each variant runs the same methods on the same real pool starts (every non-target digit) and noise starts as
the plain float32 engine; the figures say how many starts changed success, and how far flip steps moved.

    python -m benchmarks.tolerance [--arch small_cnn] [--seeds 32] [--steps 50] [--device cuda]
                                 [--mnist-dir DIR | --model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import model_for
from eightgen.attack.optimize import optimize
from eightgen.config import AttackConfig, all_but
from eightgen.data.assembly import load_assembled
from eightgen.data.starts import make_starts
from eightgen.devices import pick_device
from eightgen.errors import EightgenError
from eightgen.models.detector import load_classifier
from eightgen.trajectory import Trajectory

VARIANTS = {"bf16": {"autocast_bf16": True}, "compile": {"compile": True}, "bf16+compile": {"autocast_bf16": True, "compile": True}}
METHODS = {"seed": {}, "gd_ce": {"method": "gd", "loss": "ce"}, "pgd_l2": {"method": "pgd_l2", "eps": 3.0}}


def compare(base: Trajectory, other: Trajectory) -> dict[str, float]:
    """Success and flip-step agreement of two runs over the same starts (success = flipped within the budget)."""
    a, b = np.asarray(base.flip_step), np.asarray(other.flip_step)
    if a.shape != b.shape:
        raise EightgenError(f"runs over different starts: {a.shape[0]} against {b.shape[0]}")
    both = (a >= 0) & (b >= 0)
    shift = np.abs(a[both] - b[both])
    return {
        "starts": int(len(a)),
        "success_base": float(np.mean(a >= 0)),
        "success_variant": float(np.mean(b >= 0)),
        "success_changed": float(np.mean((a >= 0) != (b >= 0))),
        "flip_step_changed": float(np.mean(shift > 0)) if len(shift) else 0.0,
        "flip_step_max_shift": int(shift.max()) if len(shift) else 0,
    }


def tolerance(model_dir: Path, dataset_dir: Path, seeds: int, steps: int, device: torch.device) -> list[dict]:
    """One row per method and variant: its agreement with the float32 run of the same method and starts."""
    model, spec = load_classifier(model_dir, device)
    data = load_assembled(dataset_dir)
    rows = []
    for method, extra in METHODS.items():
        cfg = AttackConfig(seeds=seeds, steps=steps, device=device.type, start_digits=all_but(data.target), **extra)
        starts = make_starts(cfg, data.x_pool, data.y_pool, data.i_pool, spec.channels, model.mean.cpu(), model.std.cpu())
        x0 = starts.x0.to(device)
        base = optimize(model, x0, cfg)
        for variant, options in VARIANTS.items():
            other = optimize(model, x0, cfg.model_copy(update=options))
            rows.append({"method": method, "variant": variant, **compare(base, other)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tolerance", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("small_cnn", "resnet18", "resnet34"), default="small_cnn")
    p.add_argument("--seeds", type=int, default=32, help="starts per digit and noise starts (32: 320 in all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mnist-dir", type=Path, default=None, help="MNIST IDX files to train the detector on")
    p.add_argument("--model-dir", type=Path, default=None, help="a trained model directory to use instead")
    p.add_argument("--cache-dir", type=Path, default=Path(".eightgen-cache/bench"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure; one JSON line per method and variant on stdout."""
    args = parse_args(argv)
    try:
        if args.seeds <= 0 or args.steps <= 0:
            raise EightgenError(f"--seeds and --steps must be positive, got {args.seeds} and {args.steps}")
        device = pick_device(args.device)
        if device.type != "cuda":
            raise EightgenError(f"bf16 autocast and compile are CUDA options; on {device} they change nothing to measure")
        model_dir, dataset_dir = model_for(args, args.arch)
        rows = tolerance(model_dir, dataset_dir, args.seeds, args.steps, device)
    except EightgenError as exc:
        sys.stderr.write(f"benchmarks.tolerance: error: {exc}\n")
        return 2
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
