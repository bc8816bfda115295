"""A small U-Net that predicts the noise in a 28x28 image at a diffusion timestep (the denoiser)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from eightgen.errors import EightgenError

IMAGE_SIZE = 28


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [n, dim] of integer timesteps t [n] (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU; the time embedding is added between them."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [n, c_in, h, w], emb [n, emb_dim] -> [n, c_out, h, w]."""
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """Noise predictor eps(x_t, t) for one-channel 28x28 images: three resolutions (28, 14, 7), skip connections."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), emb_dim: int = 128) -> None:
        super().__init__()
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise EightgenError(f"the U-Net needs three positive widths, got {list(widths)}")
        w1, w2, w3 = widths
        self.widths, self.emb_dim = tuple(widths), emb_dim
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(1, w1, 3, padding=1)
        self.down1 = ResBlock(w1, w1, emb_dim)
        self.pool1 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)  # 28 -> 14
        self.down2 = ResBlock(w2, w2, emb_dim)
        self.pool2 = nn.Conv2d(w2, w3, 3, stride=2, padding=1)  # 14 -> 7
        self.mid = ResBlock(w3, w3, emb_dim)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)  # 7 -> 14
        self.dec2 = ResBlock(2 * w2, w2, emb_dim)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)  # 14 -> 28
        self.dec1 = ResBlock(2 * w1, w1, emb_dim)
        self.out = nn.Sequential(_norm(w1), nn.SiLU(), nn.Conv2d(w1, 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # starts by predicting zero noise: a stable first step
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise [n, 1, 28, 28] of noisy images x [n, 1, 28, 28] at integer timesteps t [n]."""
        emb = self.time(timestep_embedding(t, self.emb_dim))
        h1 = self.down1(self.stem(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.pool2(h2), emb)
        h = self.dec2(torch.cat([self.up2(h), h2], dim=1), emb)
        h = self.dec1(torch.cat([self.up1(h), h1], dim=1), emb)
        return self.out(h)


def n_parameters(model: nn.Module) -> int:
    """How many trainable numbers a model has."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
