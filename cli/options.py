"""The command-line options: the groups every command that builds data, detectors or runs shares (data, storage,
device: declared once, applied by one table), and the ones that make an ExperimentConfig (`run`, `serve`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eightgen.classes import CLASS_SETS
from eightgen.config import PRESETS, ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import location

OVERRIDES: dict[str, tuple[str, str]] = {
    # option dest -> (config section, field); the shared options are applied by apply_shared
    "seeds": ("attack", "seeds"),
    "starts_per_digit": ("attack", "starts_per_digit"),
    "pool_per_digit": ("dataset", "pool_per_digit"),
    "noise": ("attack", "include_noise"),
    "steps": ("attack", "steps"),
    "method": ("attack", "method"),
    "loss": ("attack", "loss"),
    "lr": ("attack", "lr"),
    "eps": ("attack", "eps"),
    "record_every": ("attack", "record_every"),
    "early_stop": ("attack", "early_stop"),
    "chunk_size": ("attack", "chunk_size"),
    "arch": ("train", "arch"),
    "epochs": ("train", "epochs"),
    "pretrained": ("train", "pretrained"),
    "balance": ("dataset", "balance"),
    "max_train": ("dataset", "max_train"),
}


ALL_BUT_TARGET = "all"


def digits_arg(text: str) -> tuple[int, ...] | str:
    """Parse '0,1,2' (or 'none') into a tuple of class indices; 'all' stays 'all' (every class but the target)."""
    if text == ALL_BUT_TARGET:
        return ALL_BUT_TARGET
    if text == "none":
        return ()
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"digits must be comma-separated integers, got {text!r}") from None


def count_or_all(text: str) -> int | str:
    """Parse a positive count, or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def pool_for_starts(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Hold out as many pool images per class as the starts per class ask for, unless --pool-per-digit says otherwise."""
    want = getattr(args, "starts_per_digit", None)
    if want is None and data["attack"]["starts_per_digit"] is None:
        want = getattr(args, "seeds", None)
    if want is None or getattr(args, "pool_per_digit", None) is not None:
        return
    have = data["dataset"]["pool_per_digit"]
    if want == "all" or (have != "all" and want > have):
        data["dataset"]["pool_per_digit"] = want


def experiment_options(p: argparse.ArgumentParser) -> None:
    """The options that make an ExperimentConfig (shared by `run` and `serve`), and where chunks run."""
    p.add_argument("--preset", default="quick", help=f"named settings to start from: {', '.join(PRESETS)} (default quick)")
    g = p.add_argument_group("data")
    data_options(g)
    g.add_argument("--balance", choices=["none", "undersample", "oversample"], help="balance target vs not-target in training")
    g.add_argument("--max-train", type=int, help="cap the training split at this many images")
    g = p.add_argument_group("classifier")
    g.add_argument("--arch", help="small_cnn, resnet18 or resnet34")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None, help="ImageNet weights for resnets (needs network or a filled torch hub cache)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seeds", type=int, help="noise starts, and starts per start class unless --starts-per-digit is given")
    g.add_argument("--starts-per-digit", type=count_or_all, help="starts per start class: N or 'all' (every held-out image of the class); raises --pool-per-digit to match unless given")
    g.add_argument("--pool-per-digit", type=count_or_all, help="images per class held out of training as attack starts: N or 'all' (the whole test split; needs train and test splits)")
    digits_option(g)
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, default=None, help="include random-noise starts")
    g.add_argument("--steps", type=int, help="gradient steps per start")
    g.add_argument("--method", help="seed, gd, pgd_linf, pgd_l2 or min_l2")
    g.add_argument("--loss", help="l1_softmax, ce or margin (default: the method's own)")
    g.add_argument("--lr", type=float, help="step size (default: the method's own; seed: 1)")
    g.add_argument("--eps", type=float, help="perturbation budget for pgd methods (pixel units)")
    g.add_argument("--record-every", type=int, help="keep an image snapshot every N steps")
    g.add_argument("--early-stop", type=int, help="freeze a start once it has held the target for N steps")
    g.add_argument("--chunk-size", type=int, help="starts per optimisation task")
    device_option(g)
    g = p.add_argument_group("where")
    storage_options(g, "run directory", "preset + settings hash")
    g.add_argument("--task-runner", choices=["threads", "dask"], help="run the optimisation chunks on threads in this process (default) or on Dask workers")
    g.add_argument("--dask-address", help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (default with --task-runner dask: a local cluster, one 1-thread worker per core)")


def data_options(g: argparse._ActionsContainer) -> None:
    """The options that say which dataset, where from, and which class is the target (every command)."""
    g.add_argument("--dataset", choices=list(CLASS_SETS), help="which 28x28 10-class dataset (default mnist); its Hub name follows")
    g.add_argument("--target", type=int, help="the target class index 0-9 (default 8): the detector learns target vs not-target")
    g.add_argument("--source", choices=["auto", "hub", "idx", "local"], help="data source (auto: data dir, local path, else the Hub)")
    g.add_argument("--mnist-dir", "--data-dir", dest="mnist_dir", type=Path, help="folder of IDX files, MNIST's file names (train-*/t10k-*), for either dataset (default: $EIGHTGEN_MNIST_DIR)")
    g.add_argument("--local-path", type=Path, help="Hugging Face dataset on disk: parquet file/folder or save_to_disk folder")


def digits_option(g: argparse._ActionsContainer) -> None:
    """The start classes (every command)."""
    g.add_argument("--digits", type=digits_arg, help="start classes, e.g. 0,1,2 ('all' = every class but the target, the default; 'none')")


def device_option(g: argparse._ActionsContainer) -> None:
    """Where torch runs (every command; each one sets it on everything it trains, optimises or samples)."""
    g.add_argument("--device", help="auto, cpu, cuda or mps")


def storage_options(g: argparse._ActionsContainer, what: str, default_name: str) -> None:
    """Where results and the cache live, and whether finished work is recomputed or replaced (every command)."""
    g.add_argument("--runs-root", type=location, help=f"folder that holds the {what}: a path, or a store URL such as s3://bucket/runs (default runs/)")
    g.add_argument("--cache-dir", type=location, help="content-addressed store of datasets, models, chunks: a path, or a store URL such as s3://bucket/cache (default .eightgen-cache/)")
    g.add_argument("--run-name", help=f"{what} name (default: {default_name})")
    g.add_argument("--force", action="store_true", help="recompute what follows the data and training even if cached")
    g.add_argument("--overwrite", action="store_true", help=f"replace a {what} that holds results of other settings")
    g.add_argument(
        "--lock-url", help="Redis URL (redis://host:port/db) for the stage locks, so runs on several hosts compute each output "
        "once (default $EIGHTGEN_LOCK_URL; none: lock files in the cache)"
    )


@dataclass(frozen=True)
class Places:
    """Where a command's config (as a model_dump) keeps what the shared options set: paths of sections."""

    dataset: tuple[str, ...]
    attacks: tuple[tuple[str, ...], ...]
    storage: tuple[str, ...]
    devices: tuple[tuple[str, ...], ...]


# The shared options' one table: option dest -> field of the dataset section.
DATASET_FIELDS = {"dataset": "name", "source": "source", "mnist_dir": "mnist_dir", "local_path": "local_path"}
STORAGE_FIELDS = ("runs_root", "cache_dir", "run_name")


def _at(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        data = data[key]
    return data


def apply_shared(data: dict[str, Any], args: argparse.Namespace, places: Places) -> None:
    """Apply the data, start-class, storage and device options to a config dump where `places` says; the target goes to
    the dataset (its one field), the start classes and Hub name follow it and the dataset, and $EIGHTGEN_MNIST_DIR is
    the data dir when none is given."""
    dataset = _at(data, places.dataset)
    for dest, field in DATASET_FIELDS.items():
        if getattr(args, dest, None) is not None:
            dataset[field] = getattr(args, dest)
    if getattr(args, "dataset", None) is not None:
        dataset["hub_name"] = None  # the dataset's own
    target, digits = getattr(args, "target", None), getattr(args, "digits", None)
    for attack in [_at(data, a) for a in places.attacks]:
        if digits == ALL_BUT_TARGET or (digits is None and target is not None):
            attack["start_digits"] = None  # every class but the target
        elif digits is not None:
            attack["start_digits"] = digits
    if target is not None:
        dataset["target"] = target
    storage = _at(data, places.storage)
    for field in STORAGE_FIELDS:
        if getattr(args, field, None) is not None:
            storage[field] = getattr(args, field)
    if getattr(args, "device", None) is not None:
        for path in places.devices:
            _at(data, path)["device"] = args.device
    env_dir = os.environ.get("EIGHTGEN_MNIST_DIR")
    if env_dir and dataset["mnist_dir"] is None and dataset["local_path"] is None:
        dataset["mnist_dir"] = Path(env_dir)


RUN_PLACES = Places(dataset=("dataset",), attacks=(("attack",),), storage=(), devices=(("attack",),))


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """Preset + command-line overrides + the shared options, validated as one ExperimentConfig."""
    if args.preset not in PRESETS:
        raise EightgenError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    data: dict[str, Any] = PRESETS[args.preset].model_dump()
    for dest, (section, field) in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            (data[section] if section else data)[field] = value
    apply_shared(data, args, RUN_PLACES)
    pool_for_starts(data, args)
    return ExperimentConfig.model_validate(data)
