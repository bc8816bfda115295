"""How close a set of images is to real ones, and how varied it is: Fréchet distance on a network's features, diversity."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from eightgen.errors import EightgenError

BATCH = 1024


@torch.no_grad()
def penultimate(model: nn.Module, x: Tensor) -> np.ndarray:
    """What a classifier's last linear layer reads for each image [n, ...]: float64 [n, d]."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise EightgenError(f"{type(model).__name__} has no linear layer to read features before")
    seen: list[Tensor] = []
    hook = last[-1].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach().flatten(1).cpu()))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(x), BATCH):
            model(x[i : i + BATCH].to(device))
    finally:
        hook.remove()
    return torch.cat(seen).double().numpy() if seen else np.zeros((0, 0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d]: |μa−μb|² + Tr(Σa + Σb − 2(ΣaΣb)^½).

    When features outnumber the images (penultimate features: thousands), Σa = AᵀA with A the centred features
    / √(n−1) gives Tr((ΣaΣb)^½) = Tr((A Σb Aᵀ)^½): an n×n square root instead of a d×d one, and exact.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EightgenError(f"feature sets must be [n, d] of one d, got {list(a.shape)} and {list(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise EightgenError(f"a Fréchet distance needs at least 2 images per set, got {len(a)} and {len(b)}")
    if len(a) > len(b):
        a, b = b, a  # the root is taken over the smaller set
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca = (a - mu_a) / np.sqrt(len(a) - 1)
    cb = (b - mu_b) / np.sqrt(len(b) - 1)
    if a.shape[1] <= len(a):
        m = (ca.T @ ca) @ (cb.T @ cb)  # Σa Σb, d×d
    else:
        m = ca @ (cb.T @ cb) @ ca.T  # A Σb Aᵀ, n×n, symmetric positive semi-definite
    with warnings.catch_warnings():  # a few images give a singular (rank-deficient) product: its root is still defined
        warnings.simplefilter("ignore")
        tr_root = float(np.real(np.trace(linalg.sqrtm(m))))
    tr_a, tr_b = float(np.sum(ca * ca)), float(np.sum(cb * cb))
    return float(np.sum((mu_a - mu_b) ** 2) + tr_a + tr_b - 2.0 * tr_root)


def diversity(x: np.ndarray | Tensor, groups: np.ndarray) -> float:
    """Mean pairwise L2 (pixel units) between images of one group (e.g. one start digit) from different seeds."""
    flat = torch.as_tensor(np.asarray(x, np.float32)).reshape(len(x), -1).double()
    groups = np.asarray(groups)
    total, pairs = 0.0, 0
    for g in np.unique(groups):
        members = flat[torch.from_numpy(groups == g)]
        n = len(members)
        if n < 2:
            continue
        d = torch.cdist(members, members)
        total += float(d.sum()) / 2.0
        pairs += n * (n - 1) // 2
    return total / pairs if pairs else float("nan")
