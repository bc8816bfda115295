"""Training the denoiser (the U-Net of eightgen.diffusion.unet) with fastai on the DDPM objective, and its files on disk."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from fastai.torch_core import set_seed

import eightgen
from eightgen.artifacts import Artifact, read_manifest, read_timings, sha256_file, write_manifest, write_timings
from eightgen.config import DenoiserConfig
from eightgen.data.assembly import load_assembled
from eightgen.diffusion.callbacks import NoisePrediction, WeightAverage
from eightgen.diffusion.sampler import Schedule, make_schedule
from eightgen.diffusion.unet import UNet, n_parameters
from eightgen.errors import EightgenError
from eightgen.models.training import EpochReport, make_dataloaders

DENOISER_FILE = "denoiser.pt"
DENOISER_SPEC = "denoiser.json"


def build_denoiser(cfg: DenoiserConfig) -> UNet:
    """A fresh U-Net as the config describes."""
    return UNet(tuple(cfg.widths), cfg.emb_dim)


def train_denoiser(
    cfg: DenoiserConfig,
    dataset_dir: Path,
    out_dir: Path,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
    batches: Callable[[int, int], None] | None = None,
) -> Artifact:
    """Train the denoiser on every image of the dataset's training split (all digits); write weights, spec, manifest."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    data = load_assembled(dataset_dir)
    x_train, x_valid = np.asarray(data.x_train, np.uint8), np.asarray(data.x_valid, np.uint8)[: cfg.valid_images]
    if cfg.max_train is not None:
        x_train = x_train[: cfg.max_train]
    if len(x_train) == 0 or len(x_valid) == 0:
        raise EightgenError(f"{dataset_dir}: the denoiser needs training and validation images")
    set_seed(cfg.seed, reproducible=True)
    # Labels are unused (the callback replaces them by the noise); the loaders serve [0, 1] float images.
    dls = make_dataloaders(x_train, np.zeros(len(x_train), np.int64), x_valid, np.zeros(len(x_valid), np.int64), 1, cfg.batch_size, device)
    model = build_denoiser(cfg)
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    learn = Learner(dls, model, loss_func=MSELossFlat())
    history: list[dict] = []
    cbs = [NoisePrediction(schedule), EpochReport(history, cfg.epochs, progress, batches, what="denoiser ")]
    if cfg.ema_decay > 0:
        cbs.append(WeightAverage(cfg.ema_decay))
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(cbs):
        learn.fit_one_cycle(cfg.epochs, cfg.lr)
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / DENOISER_FILE)
    spec = {
        "config": cfg.model_dump(mode="json"),
        "version": eightgen.__version__,
        "parameters": n_parameters(model),
        "n_train": int(len(x_train)),
        "n_valid": int(len(x_valid)),
        "history": [{k: v for k, v in row.items() if k != "seconds"} for row in history],
        "dataset_sha256": sha256_file(dataset_dir / "manifest.json"),
    }
    # Times go to timings.json, outside the manifest: the same data and settings give the same hash.
    write_timings(out_dir, {"train_seconds": round(seconds, 3), "epoch_seconds": [row["seconds"] for row in history]})
    (out_dir / DENOISER_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return write_manifest(out_dir, {"kind": "denoiser"}, [DENOISER_FILE, DENOISER_SPEC])


def read_denoiser_info(directory: Path) -> dict:
    """The denoiser's spec (settings, size, losses) with its training time when known."""
    try:
        info = json.loads((Path(directory) / DENOISER_SPEC).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EightgenError(f"{Path(directory) / DENOISER_SPEC}: unreadable ({type(exc).__name__})") from None
    return {**info, **read_timings(directory)}


def load_denoiser(directory: Path, device: torch.device) -> tuple[UNet, Schedule]:
    """The trained denoiser in a directory (verified against its manifest; eval mode, frozen) and its schedule."""
    directory = Path(directory)
    read_manifest(directory)
    # Denoisers written before the schedule and the weight average were settings used the linear one and none.
    cfg = DenoiserConfig.model_validate({"schedule": "linear", "ema_decay": 0.0, **read_denoiser_info(directory)["config"]})
    model = build_denoiser(cfg)
    model.load_state_dict(torch.load(directory / DENOISER_FILE, map_location="cpu", weights_only=True))
    return model.to(device).eval().requires_grad_(False), make_schedule(cfg.schedule, cfg.timesteps)
