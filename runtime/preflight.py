"""Checks that run before any flow starts, so bad input fails in seconds with one line."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eightgen.config import AttackConfig, ExperimentConfig, TrainConfig
from eightgen.data.assembly import assemble
from eightgen.data.grid import digit_counts
from eightgen.data.sources import load_mnist
from eightgen.errors import EightgenError
from eightgen.rundir import check_target
from eightgen.store import check_writable, is_url, local

PIXELS = 28 * 28
FLOAT_BYTES = 4
MNIST_IMAGES = 70_000
TEST_IMAGES_PER_CLASS = 1_200  # at most, for "all" starts per digit (MNIST's largest test class holds 1,135)
# Parameters of each detector with fastai's head (float32; the model dir holds them twice: model.pt and learner.pkl).
MODEL_PARAMETERS = {"small_cnn": 40_000, "resnet18": 11_700_000, "resnet34": 21_800_000}
SPACE_MARGIN = 2.0  # warn when the free space is less than this many times the estimate


def writable_dir(path: Path, option: str) -> None:
    """EightgenError unless `path` is a folder (or a store URL), or can be made one, that this user may write into."""
    if is_url(path):
        check_writable(path, option)
        return
    existing = _existing(path)
    if not existing.is_dir():
        raise EightgenError(f"{option} {path}: {existing} is a file, not a folder; name a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EightgenError(f"{option} {path}: {existing} is not writable; name a folder you may write into")


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def pretrained_weights(cfg: TrainConfig) -> None:
    """EightgenError unless the ImageNet weights that cfg asks for are in the torch hub cache or can be downloaded."""
    if not cfg.pretrained:
        return
    if cfg.arch not in ("resnet18", "resnet34"):
        raise EightgenError(f"train.pretrained=true: {cfg.arch} has no pretrained weights; pass --no-pretrained or --arch resnet18/resnet34")
    # torch loads only when weights are asked for
    from eightgen.models.detector import imagenet_weights

    url, cached, available = imagenet_weights(cfg.arch)
    if not available:
        raise EightgenError(
            f"train.pretrained=true ({cfg.arch}): the ImageNet weights are not in the torch hub cache and {url} "
            f"cannot be reached; pass --no-pretrained, or put {cached.name} in {cached.parent} (its location follows TORCH_HOME)"
        )


def _starts(cfg: AttackConfig) -> int:
    per_digit = TEST_IMAGES_PER_CLASS if cfg.per_digit == "all" else cfg.per_digit
    return cfg.seeds * int(cfg.include_noise) + per_digit * len(cfg.start_digits)


def _snapshots(cfg: AttackConfig) -> int:
    """How many images the optimisation keeps per start: steps 0, record_every, ... and the last step."""
    return cfg.steps // cfg.record_every + 1 + int(cfg.steps % cfg.record_every != 0)


def space_needed(runs: Sequence[ExperimentConfig]) -> list[tuple[str, Path, int]]:
    """(option, folder, bytes) the runs write at most: the cache (dataset, models, chunks) and the run directories.

    Snapshots count as float32 (they are stored as compressed float16); datasets and models already in the cache count too."""
    images = sum(_starts(r.attack) * _snapshots(r.attack) * PIXELS * r.train.channels * FLOAT_BYTES for r in runs)
    datasets = {r.dataset for r in runs}
    models = {(r.dataset, r.train) for r in runs}
    cache = images  # the optimisation chunks
    cache += sum((min(d.max_train or MNIST_IMAGES, MNIST_IMAGES) + 10_000) * PIXELS for d in datasets)
    cache += sum(2 * MODEL_PARAMETERS[t.arch] * FLOAT_BYTES for _, t in models)
    return [("--cache-dir", runs[0].cache_dir, cache), ("--runs-root", runs[0].runs_root, images)]


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_space(needs: Sequence[tuple[str, Path, int]], usage: Callable[[Path], Any] = shutil.disk_usage) -> list[str]:
    """EightgenError if a filesystem has less free space than the folders on it need; warnings where it has less than twice."""
    by_fs: dict[int, tuple[list[str], Path, int]] = {}
    for option, folder, need in needs:
        existing = _existing(local(folder))  # a store folder: this host's copy of it fills the local disk
        device = existing.stat().st_dev
        options, first, total = by_fs.get(device, ([], existing, 0))
        by_fs[device] = ([*options, f"{option} {folder}"], first, total + need)
    warnings = []
    for options, existing, need in by_fs.values():
        free = usage(existing).free
        where = " and ".join(options)
        if free < need:
            raise EightgenError(
                f"not enough disk space for {where}: about {_size(need)} needed, {_size(free)} free; "
                "free some space, choose other folders, or ask for fewer starts, steps or snapshots (--record-every)"
            )
        if free < SPACE_MARGIN * need:
            warnings.append(f"little disk space left for {where}: about {_size(need)} needed, {_size(free)} free")
    return warnings


def preflight(cfg: ExperimentConfig, overwrite: bool = False, runs: Sequence[ExperimentConfig] = ()) -> list[str]:
    """Check the folders, the run directory, the devices, pretrained weights and disk space (for cfg, or all `runs`),
    then load and cut the data, raising EightgenError on the first problem; warnings to show."""
    writable_dir(cfg.runs_root, "--runs-root")
    writable_dir(cfg.cache_dir, "--cache-dir")
    check_target(cfg.run_dir, cfg, overwrite)
    explicit = {cfg.train.device, cfg.attack.device} - {"auto", "cpu"}
    if explicit:  # only an asked-for accelerator can be missing; "auto" falls back to the CPU
        from eightgen.devices import pick_device

        for name in sorted(explicit):
            pick_device(name)
    for train in {r.train for r in runs} or {cfg.train}:
        pretrained_weights(train)
    warnings = check_space(space_needed(list(runs) or [cfg]))
    assembled = assemble(load_mnist(cfg.dataset), cfg.dataset)
    digit_counts(cfg.attack, {d: int(n) for d, n in enumerate(np.bincount(assembled.y_pool, minlength=10))})
    return warnings
