"""Judging the paths to the target on identical starts: the referees' verdicts per image, Fréchet distance, diversity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from eightgen.errors import EightgenError
from eightgen.judge.frechet import diversity, frechet_distance, penultimate
from eightgen.judge.referees import Referees, as_shown, knn_vote

NOISE_DIGIT = -1  # start_digit of a noise start
BATCH = 1024
FRECHET_SEED = 0


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


@dataclass(frozen=True)
class FrechetSamples:
    """Which images every Fréchet distance compares, n against n: a path's results against real target sample A;
    the floor is real target sample B (disjoint from A) against A, the ceiling real non-target images against A."""

    n: int
    seed: int
    starts: dict[str, np.ndarray]  # per start kind: positions in the start order (the same starts on every path)
    reference: np.ndarray  # positions in the real images: target sample A
    floor: np.ndarray  # target sample B
    ceiling: np.ndarray  # non-target images


def frechet_samples(kinds: np.ndarray, real_y: np.ndarray, target: int, n: int | None = None, seed: int = FRECHET_SEED) -> FrechetSamples:
    """Draw the Fréchet samples (fixed seed): n per row, n = the most that every row can have unless given."""
    kinds, real_y = np.asarray(kinds).astype(str), np.asarray(real_y)
    by_kind = {k: np.flatnonzero(kinds == k) for k in dict.fromkeys(kinds.tolist())}
    targets, others = np.flatnonzero(real_y == target), np.flatnonzero(real_y != target)
    most = min([len(v) for v in by_kind.values()] + [len(targets) // 2, len(others)])
    n = most if n is None else n
    if n > most or n < 2:
        raise EightgenError(
            f"Fréchet samples of n = {n}: the starts of a kind ({', '.join(f'{k} {len(v)}' for k, v in by_kind.items())}), "
            f"half the {len(targets)} real target images (two disjoint samples) and {len(others)} other real images allow n ≤ {most}"
        )
    rng = np.random.default_rng(seed)
    drawn = rng.permutation(targets)
    pick = lambda where: np.sort(rng.permutation(where)[:n])  # noqa: E731
    return FrechetSamples(
        n=n, seed=seed, starts={k: pick(v) for k, v in by_kind.items()},
        reference=np.sort(drawn[:n]), floor=np.sort(drawn[n : 2 * n]), ceiling=pick(others),
    )


def image_features(refs: Referees, x: np.ndarray) -> np.ndarray:
    """The robust referee's penultimate features of images as shown ([n, C, 28, 28] pixels, or [n, 28, 28] uint8)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) / 255.0).reshape(len(x), 1, 28, 28)
    return penultimate(refs.robust, as_shown(torch.as_tensor(x)))


def path_diversity(x: np.ndarray, start_digit: np.ndarray) -> float:
    """Mean pairwise L2 between results of different seeds from the same kind of start (one start digit, or noise)."""
    return diversity(as_shown(torch.as_tensor(x)).numpy(), np.asarray(start_digit))
