"""Pixel-space update rules: a step along the loss gradient, then a projection back onto the allowed set.

Every rule works per start on x [m, C, 28, 28] with the gradient g of that start's own loss; `radius` is the
per-start budget [m] of the rules that have one. The loop in eightgen/attack/optimize.py calls, for each step t:
adapt (radius from whether x_t is classified target), step, project. step and project work in place on the
loop's own x and g (and return x): one pass over the images per operation, no temporaries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from eightgen.config import AttackConfig
from eightgen.errors import EightgenError

if TYPE_CHECKING:  # the rules call tensor methods only, so the report can read their defaults without loading torch
    from torch import Tensor

TINY = 1e-12


def _norms(v: Tensor) -> Tensor:
    """Per-start L2 norm over all pixels of all channels, shaped [m, 1, 1, 1] for broadcasting."""
    return v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)


def _r(radius: Tensor) -> Tensor:
    """A per-start radius [m] shaped for broadcasting over images."""
    return radius.reshape(-1, 1, 1, 1)


def _along_unit(x: Tensor, grad: Tensor, gnorm: Tensor | None, alpha: float) -> Tensor:
    """x <- x - alpha * g / ||g|| per start (a zero gradient leaves x where it is); gnorm: ||g|| [m] if known."""
    norm = grad.flatten(1).norm(dim=1) if gnorm is None else gnorm.to(grad.dtype)
    return x.addcmul_(grad, _r(-alpha / norm.clamp_min(TINY)))


class Method:
    """One update rule: `step` moves x along its gradient, `project` puts it back into the allowed set."""

    name = "base"
    default_lr = 1.0  # the step size when the config gives no lr
    default_loss = "ce"  # the loss when the config gives none
    keeps_best = False  # output the smallest flipping perturbation seen instead of the last iterate
    uses_grad_norm = False  # step needs ||g|| per start (the loop passes it when it has it)

    def __init__(self, lr: float, steps: int, eps: float | None) -> None:
        self.lr, self.steps, self.eps = lr, steps, eps

    def radius(self, x0: Tensor) -> Tensor | None:
        """The initial per-start budget [n], or None for rules without one."""
        return None

    def adapt(self, radius: Tensor, is_target: Tensor) -> Tensor:
        """The budget for the next step given whether x_t is classified target."""
        return radius

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        """x_{t+1/2} from x_t and the gradient of its loss (gnorm: its per-start norm, if known), in place."""
        raise NotImplementedError

    def project(self, x: Tensor, x0: Tensor, radius: Tensor | None) -> Tensor:
        """x_{t+1}: x_{t+1/2} moved back into the allowed set, in place."""
        return x


class Seed(Method):
    """x <- x - lr * std^2 * g   (the notebook's raw step in normalised input space, written in pixels; no clamp)."""

    name = "seed"
    default_loss = "l1_softmax"

    def __init__(self, lr: float, steps: int, eps: float | None, std: Tensor | float = 1.0) -> None:
        super().__init__(lr, steps, eps)
        self.scale = std**2 * lr

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        return x.sub_(grad.mul_(self.scale))


class GradientDescent(Method):
    """x <- clip_[0,1](x - lr * g)."""

    name = "gd"
    default_loss = "l1_softmax"

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        return x.sub_(grad, alpha=self.lr)

    def project(self, x: Tensor, x0: Tensor, radius: Tensor | None) -> Tensor:
        return x.clamp_(0.0, 1.0)


class PgdLinf(Method):
    """x <- clip_[0,1](x0 + clip_[-eps,eps](x - lr * sign(g) - x0))."""

    name = "pgd_linf"
    default_lr = 0.02

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        return x.sub_(grad.sign_(), alpha=self.lr)

    def project(self, x: Tensor, x0: Tensor, radius: Tensor | None) -> Tensor:
        return x.sub_(x0).clamp_(-self.eps, self.eps).add_(x0).clamp_(0.0, 1.0)


class PgdL2(Method):
    """x <- clip_[0,1](x0 + d * min(1, eps / ||d||)),  d = x - lr * g / ||g|| - x0."""

    name = "pgd_l2"
    default_lr = 0.25
    uses_grad_norm = True

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        return _along_unit(x, grad, gnorm, self.lr)

    def project(self, x: Tensor, x0: Tensor, radius: Tensor | None) -> Tensor:
        d = x.sub_(x0)
        return d.mul_((self.eps / _norms(d).clamp_min(TINY)).clamp_(max=1.0)).add_(x0).clamp_(0.0, 1.0)


class MinL2(Method):
    """x <- clip_[0,1](x0 + eps_t * d / ||d||),  d = x - a_t g/||g|| - x0,  eps_t = eps_{t-1}(1 -+ gamma) if x_t flips / not.

    Decoupled direction and norm (Rony et al. 2019): a_t decays from lr on a cosine; the loop keeps the smallest
    flipping iterate as the output.
    """

    name = "min_l2"
    default_lr = 0.5
    default_loss = "margin"
    keeps_best = True
    uses_grad_norm = True
    gamma = 0.05
    floor = 0.01  # the cosine schedule ends at floor * lr

    def radius(self, x0: Tensor) -> Tensor:
        # Nothing in [0,1] lies further from x0 than its farthest box corner.
        worst = x0.maximum(1.0 - x0).flatten(1).norm(dim=1)
        return worst.clamp(max=1.0 if self.eps is None else self.eps)

    def adapt(self, radius: Tensor, is_target: Tensor) -> Tensor:
        # (1 + gamma) where not yet target, (1 - gamma) where target
        return radius * (1.0 + self.gamma - 2.0 * self.gamma * is_target.to(radius.dtype))

    def step(self, x: Tensor, grad: Tensor, t: int, gnorm: Tensor | None = None) -> Tensor:
        low = self.floor * self.lr
        alpha = low + (self.lr - low) * (1.0 + math.cos(math.pi * t / self.steps)) / 2.0
        return _along_unit(x, grad, gnorm, alpha)

    def project(self, x: Tensor, x0: Tensor, radius: Tensor | None) -> Tensor:
        d = x.sub_(x0)
        return d.mul_(_r(radius) / _norms(d).clamp_min(TINY)).add_(x0).clamp_(0.0, 1.0)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Seed, GradientDescent, PgdLinf, PgdL2, MinL2)}


def method_of(cfg: AttackConfig) -> type[Method]:
    """The update rule cfg.method names."""
    if cfg.method not in METHODS:
        raise EightgenError(f"unknown method {cfg.method!r} (expected one of {', '.join(METHODS)})")
    return METHODS[cfg.method]


def step_size(cfg: AttackConfig) -> float:
    """The step size in force: cfg.lr if given, else the method's default."""
    return cfg.lr if cfg.lr is not None else method_of(cfg).default_lr


def loss_name(cfg: AttackConfig) -> str:
    """The loss in force: cfg.loss if given, else the method's default."""
    return cfg.loss if cfg.loss is not None else method_of(cfg).default_loss


def make_method(cfg: AttackConfig, std: Tensor | float = 1.0) -> Method:
    """The update rule of cfg.method with its step size, budget and (for seed) the model's input std."""
    rule = method_of(cfg)
    if cfg.method in ("pgd_linf", "pgd_l2") and cfg.eps is None:
        raise EightgenError(f"method {cfg.method!r} needs eps (its budget)")
    if rule is Seed:
        return Seed(step_size(cfg), cfg.steps, cfg.eps, std)
    return rule(step_size(cfg), cfg.steps, cfg.eps)
