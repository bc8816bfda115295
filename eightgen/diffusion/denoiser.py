"""Training the denoiser (the U-Net of eightgen.diffusion.unet) with fastai on the DDPM objective (its callbacks), and its files on disk."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from fastai.torch_core import set_seed
from torch import Tensor

import eightgen
from eightgen.artifacts import Artifact, read_manifest, read_timings, sha256_file, write_manifest, write_timings
from eightgen.config import DenoiserConfig
from eightgen.data.assembly import load_assembled
from eightgen.diffusion.sampler import Schedule, make_schedule, q_sample, to_model_space
from eightgen.diffusion.unet import UNet, n_parameters
from eightgen.errors import EightgenError
from eightgen.models.training import EpochReport, make_dataloaders

DENOISER_FILE = "denoiser.pt"
DENOISER_SPEC = "denoiser.json"


class NoisePrediction(Callback):
    """fastai callback of the DDPM objective: each batch of clean [0, 1] images becomes ((x_t, t), ε).

    With an MSE loss the Learner then trains the denoiser to predict the noise (Ho et al. 2020, L_simple).
    Timesteps and noise come from torch's global generator, which fastai's set_seed fixes.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def before_batch(self) -> None:
        """Noise the batch at uniformly drawn timesteps; the target is the noise."""
        (xb,) = self.learn.xb
        x0 = to_model_space(xb.as_subclass(Tensor).float())
        t = torch.randint(0, self.schedule.timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        self.learn.xb = (q_sample(x0, t, noise, self.schedule), t)
        self.learn.yb = (noise,)


class WeightAverage(Callback):
    """fastai callback keeping an exponential moving average of the model's weights (and buffers).

    The average is what validation sees and what the model holds after fitting: averaged weights sample cleaner
    images than the last step's (Ho et al. 2020; Nichol & Dhariwal 2021). The decay warms up as min(decay,
    (1 + n)/(10 + n)) after n steps, so the first steps do not pin the average to the random start.
    """

    order = 90  # after the optimiser step

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def before_fit(self) -> None:
        """Start the average at the initial weights."""
        self.shadow = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self.updates = 0

    def after_step(self) -> None:
        """Move the average toward the weights the optimiser just wrote."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, v in self.learn.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
                else:
                    self.shadow[k].copy_(v)

    def _swap(self) -> None:
        live = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self.learn.model.load_state_dict(self.shadow)
        self.shadow = live

    def before_validate(self) -> None:
        """Validate the averaged weights."""
        self._swap()

    def after_validate(self) -> None:
        """Train on the live weights again."""
        self._swap()

    def after_fit(self) -> None:
        """Leave the averaged weights in the model."""
        self.learn.model.load_state_dict(self.shadow)


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
