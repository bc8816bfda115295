"""The options that make an ExperimentConfig, shared by `eightgen run` and `eightgen serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from eightgen.config import PRESETS, ExperimentConfig
from eightgen.errors import EightgenError

OVERRIDES: dict[str, tuple[str, str]] = {
    # option dest -> (config section, field)
    "seeds": ("attack", "seeds"),
    "digits": ("attack", "start_digits"),
    "noise": ("attack", "include_noise"),
    "steps": ("attack", "steps"),
    "method": ("attack", "method"),
    "loss": ("attack", "loss"),
    "lr": ("attack", "lr"),
    "eps": ("attack", "eps"),
    "record_every": ("attack", "record_every"),
    "early_stop": ("attack", "early_stop"),
    "chunk_size": ("attack", "chunk_size"),
    "device": ("attack", "device"),
    "arch": ("train", "arch"),
    "epochs": ("train", "epochs"),
    "pretrained": ("train", "pretrained"),
    "source": ("dataset", "source"),
    "mnist_dir": ("dataset", "mnist_dir"),
    "local_path": ("dataset", "local_path"),
    "balance": ("dataset", "balance"),
    "max_train": ("dataset", "max_train"),
    "runs_root": ("", "runs_root"),
    "cache_dir": ("", "cache_dir"),
    "run_name": ("", "run_name"),
}


def _digits(text: str) -> tuple[int, ...]:
    """Parse '0,1,2' (or 'all' / 'none') into a tuple of digits."""
    if text == "all":
        return (0, 1, 2, 3, 4, 5, 6, 7, 9)
    if text == "none":
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"digits must be comma-separated integers, got {text!r}") from None


def experiment_options(p: argparse.ArgumentParser) -> None:
    """The options that make an ExperimentConfig (shared by `run` and `serve`), and where chunks run."""
    p.add_argument("--preset", default="quick", help=f"named settings to start from: {', '.join(PRESETS)} (default quick)")
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=["auto", "hub", "idx", "local"], help="MNIST source (auto: mnist dir, local path, else the Hub)")
    g.add_argument("--mnist-dir", type=Path, help="folder of MNIST IDX files (default: $EIGHTGEN_MNIST_DIR)")
    g.add_argument("--local-path", type=Path, help="Hugging Face dataset on disk: parquet file/folder or save_to_disk folder")
    g.add_argument("--balance", choices=["none", "undersample", "oversample"], help="balance 8 vs not-8 in training")
    g.add_argument("--max-train", type=int, help="cap the training split at this many images")
    g = p.add_argument_group("classifier")
    g.add_argument("--arch", help="small_cnn, resnet18 or resnet34")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None, help="ImageNet weights for resnets (needs network or a filled torch hub cache)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seeds", type=int, help="seeds per start digit (and noise starts)")
    g.add_argument("--digits", type=_digits, help="start digits, e.g. 0,1,2 ('all' = every non-8, 'none')")
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, default=None, help="include random-noise starts")
    g.add_argument("--steps", type=int, help="gradient steps per start")
    g.add_argument("--method", help="seed, gd, pgd_linf, pgd_l2 or min_l2")
    g.add_argument("--loss", help="l1_softmax, ce or margin (default: the method's own)")
    g.add_argument("--lr", type=float, help="step size (default: the method's own; seed: 1)")
    g.add_argument("--eps", type=float, help="perturbation budget for pgd methods (pixel units)")
    g.add_argument("--record-every", type=int, help="keep an image snapshot every N steps")
    g.add_argument("--early-stop", type=int, help="freeze a start once it has held the target for N steps")
    g.add_argument("--chunk-size", type=int, help="starts per optimisation task")
    g.add_argument("--device", help="auto, cpu, cuda or mps")
    g = p.add_argument_group("where")
    g.add_argument("--runs-root", type=Path, help="folder that holds run directories (default runs/)")
    g.add_argument("--cache-dir", type=Path, help="content-addressed store of datasets, models, chunks")
    g.add_argument("--run-name", help="run directory name (default: preset + settings hash)")
    g.add_argument("--force", action="store_true", help="recompute the optimisation and report even if cached")
    g.add_argument("--overwrite", action="store_true", help="replace a run directory that holds a run of other settings (results, trajectories, config and report together)")
    g.add_argument("--task-runner", choices=["threads", "dask"], help="run the optimisation chunks on threads in this process (default) or on Dask workers")
    g.add_argument("--dask-address", help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (default with --task-runner dask: a local cluster, one 1-thread worker per core)")


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """Preset + command-line overrides + $EIGHTGEN_MNIST_DIR, validated as one ExperimentConfig."""
    if args.preset not in PRESETS:
        raise EightgenError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    data: dict[str, Any] = PRESETS[args.preset].model_dump()
    for dest, (section, field) in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            (data[section] if section else data)[field] = value
    env_dir = os.environ.get("EIGHTGEN_MNIST_DIR")
    if env_dir and data["dataset"]["mnist_dir"] is None and data["dataset"]["local_path"] is None:
        data["dataset"]["mnist_dir"] = Path(env_dir)
    return ExperimentConfig.model_validate(data)
