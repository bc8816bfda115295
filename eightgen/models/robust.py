"""Adversarial (PGD) training and evaluation: the attack, a fastai callback that trains on it, robust accuracy."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from torch import Tensor, nn

from eightgen.config import TrainConfig
from eightgen.errors import EightgenError

Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = ("l2", "linf")
EVAL_STEPS = 20  # PGD steps of the robust-accuracy evaluation
EVAL_IMAGES = 500  # validation images the robust accuracy is measured on (the first ones)
EVAL_BATCH = 250
STEP_FACTOR = 2.5  # default step size = STEP_FACTOR * eps / steps (Madry et al. 2018)
TINY = 1e-12


def default_step_size(eps: float, steps: int) -> float:
    """2.5 eps / steps: enough to reach the edge of the ball from anywhere in it, with room to move along it."""
    return STEP_FACTOR * eps / steps


def _norms(v: Tensor) -> Tensor:
    """Per-image L2 norm over every pixel of every channel, shaped [n, 1, 1, 1]."""
    return v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)


def _random_start(x: Tensor, norm: str, eps: float, generator: torch.Generator | None) -> Tensor:
    """A random perturbation inside the eps-ball (uniform per pixel for L-inf; random direction and radius for L2)."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    d = torch.randn(x.shape, generator=generator, device=x.device)
    r = torch.rand((len(x), 1, 1, 1), generator=generator, device=x.device) * eps
    return d / _norms(d).clamp_min(TINY) * r


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted PGD: images within eps (L2 or L-inf, pixel units) of x, in [0, 1], that raise the loss of labels y.

    The model is used as it is (the caller picks train or eval mode); per-image losses are summed, so an
    image's attack does not depend on its batch neighbours when the model is in eval mode.
    """
    if norm not in NORMS:
        raise EightgenError(f"unknown PGD norm {norm!r} (expected l2 or linf)")
    if eps <= 0 or steps <= 0:
        raise EightgenError(f"PGD needs eps > 0 and steps > 0, got eps={eps}, steps={steps}")
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    x = x.detach()
    delta = _random_start(x, norm, eps, generator) if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0.0, 1.0) - x
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = delta.detach()
            if norm == "linf":
                delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            else:
                delta = delta + alpha * grad / _norms(grad).clamp_min(TINY)
                delta = delta * (eps / _norms(delta).clamp_min(TINY)).clamp(max=1.0)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()


class AdversarialTraining(Callback):
    """Replaces every training batch by its PGD adversarial version (Madry et al. 2018); validation stays clean.

    The attack runs with the model in eval mode: BatchNorm then normalises with its running statistics, so the
    attack's own forward passes neither update those statistics nor couple the images of a batch, and each
    image is attacked exactly as the trained model will be attacked later. The weights then train (train mode)
    on the adversarial batch alone.
    """

    run_valid = False

    def __init__(self, norm: str, eps: float, steps: int, step_size: float | None = None) -> None:
        if norm not in NORMS:
            raise EightgenError(f"unknown adversarial training norm {norm!r} (expected l2 or linf)")
        self.norm, self.eps, self.steps, self.step_size = norm, eps, steps, step_size

    def before_batch(self) -> None:
        """Swap the clean batch for its adversarial version."""
        (xb,), (yb,) = self.learn.xb, self.learn.yb
        model = self.learn.model
        was_training = model.training
        model.eval()
        try:
            adv = pgd(
                model,
                xb.as_subclass(Tensor),
                yb.as_subclass(Tensor).long(),
                norm=self.norm,
                eps=self.eps,
                steps=self.steps,
                step_size=self.step_size,
            )
        finally:
            model.train(was_training)
        self.learn.xb = (adv.as_subclass(type(xb)),)


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: np.ndarray | Tensor,
    *,
    norm: str,
    eps: float,
    steps: int = EVAL_STEPS,
    step_size: float | None = None,
    batch_size: int = EVAL_BATCH,
) -> dict:
    """Accuracy on x and under a `steps`-step PGD of radius eps (eval mode, zero start so it is deterministic)."""
    if len(x) == 0:
        raise EightgenError("robust accuracy needs at least one image")
    device = next(model.parameters()).device
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    training = model.training
    model.eval()
    clean = adversarial = 0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            adv = pgd(model, xb, yb, norm=norm, eps=eps, steps=steps, step_size=step_size, random_start=False)
            with torch.no_grad():
                adversarial += int((model(adv).argmax(1) == yb).sum())
    finally:
        model.train(training)
    n = len(x)
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    return {
        "norm": norm,
        "eps": float(eps),
        "steps": int(steps),
        "step_size": float(alpha),
        "n": int(n),
        "clean_accuracy": clean / n,
        "robust_accuracy": adversarial / n,
        "robust_error": 1.0 - adversarial / n,
    }


def adversarial_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The fastai callbacks a training config asks for: PGD adversarial training, or none."""
    if cfg.adversarial == "none":
        return []
    return [AdversarialTraining(cfg.adversarial, float(cfg.adv_eps), cfg.adv_steps, cfg.adv_step_size)]


def robust_metrics(cfg: TrainConfig, model: nn.Module, x_valid: Tensor, y_valid: np.ndarray) -> dict:
    """{"robust": 20-step PGD accuracy on the first EVAL_IMAGES validation images} if cfg asks for it, else {}."""
    if cfg.robust_eval is None or len(x_valid) == 0:
        return {}
    norm, eps = cfg.robust_eval
    return {"robust": robust_accuracy(model, x_valid[:EVAL_IMAGES], np.asarray(y_valid)[:EVAL_IMAGES], norm=norm, eps=eps)}
