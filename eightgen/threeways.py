"""Judging the paths to the target on identical starts: the referees' verdicts per image, Fréchet distance, diversity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from eightgen.errors import EightgenError
from eightgen.frechet import diversity, frechet_distance, penultimate
from eightgen.referees import Referees, as_shown, knn_vote

NOISE_DIGIT = -1  # start_digit of a noise start
BATCH = 1024


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    return torch.cat([model(x[i : i + BATCH].to(device)).argmax(1).cpu() for i in range(0, len(x), BATCH)]).numpy()


def judge_images(refs: Referees, x: np.ndarray, x0: np.ndarray, start_digit: np.ndarray, target: int) -> pd.DataFrame:
    """Per image: the k-NN vote over real images of all ten classes, the two-class vote (target vs start digit; digit
    starts only), the robust referee's class, and the L2 distance from the start (pixels, as shown)."""
    shown, start = as_shown(torch.as_tensor(x)), as_shown(torch.as_tensor(x0))
    digits = np.asarray(start_digit, dtype=np.int64)
    every = np.full(len(shown), NOISE_DIGIT, dtype=np.int64)
    share10, is10 = knn_vote(shown, every, refs.knn_x, refs.knn_y, target=target, k=refs.k)
    share2, is2 = knn_vote(shown, digits, refs.knn_x, refs.knn_y, target=target, k=refs.k)
    digit = digits >= 0
    pred = _predict(refs.robust, shown)
    return pd.DataFrame(
        {
            "knn10_share": share10,
            "knn10_is_target": is10,
            "knn2_is_target": pd.array([bool(v) if d else pd.NA for v, d in zip(is2, digit)], dtype="boolean"),
            "robust_pred": pred,
            "robust_is_target": pred == target,
            "l2_from_start": (shown - start).flatten(1).norm(dim=1).double().numpy(),
        }
    )


def real_target_features(refs: Referees, target: int) -> np.ndarray:
    """The robust referee's penultimate features of the real target images it was given (the referee split)."""
    real = refs.knn_x[refs.knn_y == target].reshape(-1, 1, 28, 28)
    if len(real) < 2:
        raise EightgenError(f"fewer than 2 real images of the target ({len(real)}) to compare with")
    return penultimate(refs.robust, real)


def frechet_to_real(refs: Referees, x: np.ndarray, real_features: np.ndarray) -> float:
    """Fréchet distance between images and the real target images, on the robust referee's penultimate features."""
    return frechet_distance(penultimate(refs.robust, as_shown(torch.as_tensor(x))), real_features)


def path_diversity(x: np.ndarray, start_digit: np.ndarray) -> float:
    """Mean pairwise L2 between results of different seeds from the same kind of start (one start digit, or noise)."""
    return diversity(as_shown(torch.as_tensor(x)).numpy(), np.asarray(start_digit))
