"""The fastai callbacks that train the denoiser: the DDPM objective on each batch, and a moving average of the weights."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from torch import Tensor

from eightgen.diffusion.sampler import Schedule, q_sample, to_model_space


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
