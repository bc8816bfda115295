"""Diffusion: the noise schedule, the DDPM training objective, and a DDIM sampler steered by a detector's gradient on x̂₀.

Images live in [-1, 1] inside the denoiser and in [0, 1] pixel units everywhere else (the detectors', referees'
and the report's scale). The sampler is deterministic (DDIM with eta 0): the same start and noise give the same
result, whatever the batch. The module needs torch and numpy alone; the fastai callbacks that train the denoiser on its
objective are in eightgen/diffusion/callbacks.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eightgen.errors import EightgenError

TINY = 1e-12


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule: ᾱ_t (the share of signal left at step t) for t = 0 .. T-1."""

    alpha_bar: Tensor  # float64 [T], decreasing from just under 1

    @property
    def timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return len(self.alpha_bar)


def linear_schedule(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear β schedule (Ho et al. 2020), scaled so that any T spans the same noise range as T = 1000."""
    if timesteps < 2:
        raise EightgenError(f"a diffusion needs at least 2 timesteps, got {timesteps}")
    scale = 1000.0 / timesteps
    betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), timesteps, dtype=torch.float64)
    return Schedule(torch.cumprod(1.0 - betas, dim=0))


COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal 2021: β_0 is not vanishingly small
MAX_BETA = 0.999  # no step destroys all signal (the cosine ᾱ reaches 0 at t = T)


def cosine_schedule(timesteps: int = 1000, offset: float = COSINE_OFFSET) -> Schedule:
    """The cosine schedule (Nichol & Dhariwal 2021): ᾱ_t = f(t+1)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)), β clipped at 0.999."""
    if timesteps < 2:
        raise EightgenError(f"a diffusion needs at least 2 timesteps, got {timesteps}")
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(0.0, MAX_BETA)
    return Schedule(torch.cumprod(1.0 - betas, dim=0))


SCHEDULES: dict[str, Callable[[int], Schedule]] = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, timesteps: int) -> Schedule:
    """The named noise schedule (linear or cosine) over `timesteps` steps."""
    if name not in SCHEDULES:
        raise EightgenError(f"unknown noise schedule {name!r} (have {', '.join(SCHEDULES)})")
    return SCHEDULES[name](timesteps)


def to_model_space(x: Tensor) -> Tensor:
    """Pixel images in [0, 1] -> the denoiser's [-1, 1]."""
    return x * 2.0 - 1.0


def to_pixels(x: Tensor) -> Tensor:
    """The denoiser's [-1, 1] -> pixel images in [0, 1]."""
    return (x + 1.0) / 2.0


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, per image (x0 and noise in model space [-1, 1], t [n] integers)."""
    # Cast on the CPU (MPS has no float64), indexed on the device: no wait for t to reach the host.
    ab = schedule.alpha_bar.to(dtype=x0.dtype).to(x0.device)[t].reshape(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def ddpm_loss(model: nn.Module, x0: Tensor, schedule: Schedule, generator: torch.Generator | None = None) -> Tensor:
    """The DDPM objective on clean pixel images x0 [n, 1, 28, 28]: mean squared error of the predicted noise."""
    x = to_model_space(x0)
    t = torch.randint(0, schedule.timesteps, (len(x),), generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return F.mse_loss(model(q_sample(x, t, noise, schedule), t), noise)


def ddim_timesteps(start: int, steps: int) -> list[int]:
    """The DDIM timesteps from `start` down to 0, `steps` of them evenly spaced (fewer when start is small)."""
    if start < 0 or steps < 1:
        raise EightgenError(f"DDIM needs start >= 0 and steps >= 1, got start={start}, steps={steps}")
    ts = np.unique(np.round(np.linspace(0, start, min(steps, start + 1))).astype(int))[::-1]
    return [int(t) for t in ts]


def start_timestep(level: float, schedule: Schedule) -> int:
    """The timestep of a noise level in [0, 1] (1: pure noise, t = T-1); level 0 has none (-1: no noising)."""
    if not 0.0 <= level <= 1.0:
        raise EightgenError(f"noise level must lie in [0, 1], got {level}")
    return int(round(level * (schedule.timesteps - 1))) if level > 0 else -1


def gaussian_from_uniform(u: Tensor) -> Tensor:
    """Standard normal noise from uniform [0, 1] pixels by the inverse normal CDF: the same start, as diffusion noise."""
    eps = 1e-6
    return math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(eps, 1.0 - eps) - 1.0)


def start_noise(run_id: str, shape: tuple[int, ...] = (1, 28, 28)) -> Tensor:
    """The noise that partially noises a real start: a function of its run id alone, so chunking never changes it."""
    seed = int.from_bytes(hashlib.sha256(f"eightgen-diffusion-{run_id}".encode()).digest()[:8], "little") >> 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Guide:
    """Classifier guidance: the detector whose log p(target | x̂₀) gradient steers, and how far x̂₀ moves per step."""

    detector: nn.Module  # pixel-space [0, 1] images -> logits [n, 2]; class 1 is the target
    scale: float


@dataclass(frozen=True)
class Sampled:
    """What a sampling run gives: final images, x̂₀ snapshots and p(target) per step (pixel units, [0, 1])."""

    x_final: Tensor  # [n, 1, 28, 28] float32
    snapshot_steps: np.ndarray  # [k] indices into the sampler's steps (0: the start, before any step)
    snapshots: Tensor  # [n, k, 1, 28, 28] float16: the start, then x̂₀ after the recorded steps
    p_target: Tensor  # [n, steps + 1] float32: the watching detector's p(target) on the start, then on each x̂₀
    timesteps: list[int]


def _target_prob(detector: nn.Module | None, x: Tensor) -> Tensor:
    """p(target) [n] of x on x's device (NaN without a detector)."""
    if detector is None:
        return torch.full((len(x),), float("nan"), device=x.device)
    with torch.no_grad():
        return detector(x).softmax(dim=1)[:, 1].float()


def guided_x0(x0: Tensor, guide: Guide, weight: float) -> Tensor:
    """x̂₀ (pixels) moved by scale·weight (L2, pixel units) along the normalised gradient of log p(target | x̂₀)."""
    x = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        logp = guide.detector(x).log_softmax(dim=1)[:, 1].sum()  # summed: an image's step ignores its neighbours
        (grad,) = torch.autograd.grad(logp, x)
    norm = grad.flatten(1).norm(dim=1).clamp_min(TINY).reshape(-1, 1, 1, 1)
    return (x0 + guide.scale * weight * grad / norm).clamp(0.0, 1.0)


@torch.no_grad()
def ddim_sample(
    denoiser: nn.Module,
    x_t: Tensor,
    start: int,
    schedule: Schedule,
    steps: int,
    guide: Guide | None = None,
    watch: nn.Module | None = None,
    record_every: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> Sampled:
    """Denoise x_t (model space, at timestep `start`) to t = 0 with DDIM (eta 0) in at most `steps` steps.

    With a guide, each step's x̂₀ = (x_t - √(1-ᾱ_t) ε̂)/√ᾱ_t is moved by guide.scale·√(1-ᾱ_t) along the detector's
    normalised gradient of log p(target | x̂₀): a detector never trained on noisy images judges the denoised
    estimate, and the push fades as the noise does. ε̂ is then made consistent with the moved x̂₀ (Dhariwal & Nichol
    2021's guidance, with the gradient taken on x̂₀), so the guidance is carried into x_{t-1}. `watch` records
    p(target) of x̂₀ at every step (the guide's detector when not given). start < 0: nothing to denoise, x_t is
    returned as it is (in pixels). The loop never waits for the device: what it records stays there until the end.
    """
    watch = watch if watch is not None else (guide.detector if guide is not None else None)
    x = x_t.float()
    ts = ddim_timesteps(start, steps) if start >= 0 else []
    # ᾱ of each step, then 1 (after the last), as device scalars; the guidance weights √(1-ᾱ) read on the host.
    alpha = schedule.alpha_bar.float()
    ab_seq = torch.cat([alpha[ts], torch.ones(1)]).to(x.device)
    weights = (1 - alpha[ts]).sqrt().tolist()
    pixels = to_pixels(x).clamp(0.0, 1.0) if start >= 0 else x
    snaps, snap_steps, probs = [pixels.half()], [0], [_target_prob(watch, pixels)]
    for i, t in enumerate(ts):
        ab, ab_prev = ab_seq[i], ab_seq[i + 1]
        tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, tt).float()
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1.0, 1.0)
        x0_pix = to_pixels(x0)
        if guide is not None and guide.scale > 0:
            x0_pix = guided_x0(x0_pix, guide, weights[i])
            x0 = to_model_space(x0_pix)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt().clamp_min(TINY)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        probs.append(_target_prob(watch, x0_pix))
        if (i + 1) % record_every == 0 or i + 1 == len(ts):
            snaps.append(x0_pix.half())
            snap_steps.append(i + 1)
        if progress is not None:
            progress(i + 1, len(ts))
    final = to_pixels(x).clamp(0.0, 1.0) if ts else pixels
    return Sampled(
        x_final=final.float().cpu(),
        snapshot_steps=np.asarray(snap_steps, dtype=np.int64),
        snapshots=torch.stack(snaps, dim=1).cpu(),
        p_target=torch.stack(probs, dim=1).cpu(),
        timesteps=ts,
    )


def noised_start(x0: Tensor, noise: Tensor, level: float, schedule: Schedule) -> tuple[Tensor, int]:
    """A real start x0 (pixels) noised to a level in [0, 1]: (x_t in model space, t); level 0 gives x0 itself and t = -1."""
    t = start_timestep(level, schedule)
    if t < 0:
        return x0.clone(), -1
    tt = torch.full((len(x0),), t, dtype=torch.long)
    return q_sample(to_model_space(x0), tt, noise, schedule), t
