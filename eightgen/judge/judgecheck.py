"""The judges' real-image check: how the k-NN vote and the robust and standard referees classify real held-out images
as they are, blurred, and after a denoiser round trip (noised, then denoised back), where the true class is known."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from eightgen.diffusion.sampler import Schedule, ddim_sample, noised_start
from eightgen.errors import EightgenError
from eightgen.judge.referees import N_DIGITS, Referees, as_shown

VARIANTS = ("as is", "blurred", "round trip")
JUDGES = ("knn", "robust", "cnn")  # the k-NN majority class, the robust referee, the standard referee
BATCH = 256
KNN_BATCH = 1024
NOISE_SEED = 0


def knn_classes(x: Tensor, ref_x: Tensor, ref_y: Tensor, *, k: int) -> np.ndarray:
    """The class holding more than half of each image's k nearest references (pixel L2, all classes), -1 where none does.

    For the target this is the ten-class vote of knn_vote: an image is called the target exactly when it is its class here.
    """
    flat = as_shown(x).reshape(len(x), -1)
    if k > len(ref_y):
        raise EightgenError(f"k = {k} neighbours but only {len(ref_y)} reference images")
    out = np.full(len(flat), -1, dtype=np.int64)
    for i in range(0, len(flat), KNN_BATCH):
        nearest = torch.cdist(flat[i : i + KNN_BATCH].double(), ref_x.double()).topk(k, dim=1, largest=False).indices
        votes = torch.nn.functional.one_hot(ref_y[nearest], N_DIGITS).sum(dim=1)  # [b, 10]
        count, cls = votes.max(dim=1)
        out[i : i + KNN_BATCH] = torch.where(2 * count > k, cls, torch.full_like(cls, -1)).numpy()
    return out


def per_class(y: np.ndarray, n: int) -> np.ndarray:
    """Positions of the first n images of every class in y (in the order given), classes ascending."""
    y = np.asarray(y)
    return np.concatenate([np.flatnonzero(y == c)[:n] for c in np.unique(y)])


def blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """Images [n, 1, 28, 28] in [0, 1] under a Gaussian blur of sigma pixels."""
    return ndimage.gaussian_filter(np.asarray(x, np.float32), sigma=(0, 0, sigma, sigma), mode="constant")


def round_trip(denoiser: nn.Module, schedule: Schedule, x: np.ndarray, level: float, steps: int, device: torch.device) -> np.ndarray:
    """Images [n, 1, 28, 28] in [0, 1] noised to `level` (fixed noise) and denoised back by DDIM in ⌈steps·level⌉ steps."""
    x0 = torch.as_tensor(np.asarray(x, np.float32))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    x_t, t = noised_start(x0, noise, level, schedule)
    n_steps = max(1, math.ceil(steps * level))
    out = [ddim_sample(denoiser, x_t[i : i + BATCH].to(device), t, schedule, n_steps, record_every=n_steps).x_final for i in range(0, len(x0), BATCH)]
    return torch.cat(out).numpy()


@torch.no_grad()
def judge_classes(refs: Referees, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each judge's class of every image: the k-NN majority class (-1: no majority) and each referee's argmax."""
    shown = as_shown(torch.as_tensor(np.asarray(x, np.float32)))
    device = next(refs.robust.parameters()).device
    argmax = lambda model: torch.cat([model(shown[i : i + KNN_BATCH].to(device)).argmax(1).cpu() for i in range(0, len(shown), KNN_BATCH)]).numpy().astype(np.int64)  # noqa: E731
    return {"knn": knn_classes(shown, refs.knn_x, refs.knn_y, k=refs.k), "robust": argmax(refs.robust), "cnn": argmax(refs.cnn)}
