"""The GPU check's detectors, digits and training step in plain torch: what a bare CUDA machine has, no fastai.

The resnets are built as eightgen.models.detector builds them (torchvision's resnet, one input channel, fastai's
vision_learner body cut and head) with the same modules and state_dict keys, from torch and torchvision alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eightgen.data.idx import read_idx
from eightgen.models.detector import N_OUT, PixelClassifier, SmallCNN, to_model_input

TARGET_DIGIT = 8
LR = 3e-3  # the detector's training step size (TrainConfig's default)


class ConcatPool(nn.Module):
    """fastai's AdaptiveConcatPool2d: global max and average pools side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.ap, self.mp = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


def _bn1d(features: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(features)
    nn.init.constant_(bn.bias, 1e-3)  # as fastai initialises its batch norms
    return bn


def resnet_net(arch: str, channels: int = 1) -> nn.Sequential:
    """The raw resnet detector network (normalised input -> 2 logits), randomly initialised, fastai's layout."""
    from torchvision import models as tvm

    net = {"resnet18": tvm.resnet18, "resnet34": tvm.resnet34}[arch](weights=None)
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    body = nn.Sequential(*list(net.children())[:-2])
    nf = 2 * net.fc.in_features
    head = nn.Sequential(
        ConcatPool(), nn.Flatten(),
        _bn1d(nf), nn.Dropout(0.25), nn.Linear(nf, 512, bias=False), nn.ReLU(inplace=True),
        _bn1d(512), nn.Dropout(0.5), nn.Linear(512, N_OUT, bias=False),
    )  # fmt: skip
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    return nn.Sequential(body, head)


def detector(arch: str, seed: int = 0) -> PixelClassifier:
    """A fresh one-channel detector of arch on [0, 1] pixels (no normalisation), weights from seed."""
    torch.manual_seed(seed)
    net = SmallCNN(1) if arch == "small_cnn" else resnet_net(arch, 1)
    return PixelClassifier(net, (0.0,), (1.0,))


@dataclass(frozen=True)
class Digits:
    """Images [N, 28, 28] uint8 with their labels, and where they came from."""

    x: np.ndarray
    y: np.ndarray
    source: str


def load_digits(mnist_dir: Path | None, n_noise: int = 2048) -> Digits:
    """MNIST's training split from mnist_dir (its test split if that is all there is), else labelled noise."""
    for split in ("train", "t10k"):
        images = None if mnist_dir is None else Path(mnist_dir) / f"{split}-images-idx3-ubyte.gz"
        if images is not None and images.is_file():
            labels = images.with_name(f"{split}-labels-idx1-ubyte.gz")
            return Digits(read_idx(images), read_idx(labels).astype(np.int64), f"mnist {split}")
    g = np.random.default_rng(0)
    return Digits(g.integers(0, 256, (n_noise, 28, 28), dtype=np.uint8), g.integers(0, 10, n_noise), "uniform noise")


def pool(digits: Digits, device: torch.device) -> Tensor:
    """The non-8 images as starts [m, 1, 28, 28] on device, in order."""
    return to_model_input(digits.x[digits.y != TARGET_DIGIT], 1).to(device)


def cycled(base: Tensor, start: int, stop: int) -> Tensor:
    """Starts start..stop-1 of the endless sequence base, base, base, ..."""
    return base[torch.arange(start, stop, device=base.device) % len(base)]


def starts(digits: Digits, n: int, device: torch.device) -> Tensor:
    """n starts on device: the non-8 images in order, cycled when n is larger than their number."""
    return cycled(pool(digits, device), 0, n)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor) -> Tensor:
    """One training step of the detector: cross-entropy of 8 vs not 8 (the trained detector's loss), AdamW."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    return loss.detach()


def trained(arch: str, digits: Digits, steps: int, batch: int, device: torch.device, seed: int = 0) -> PixelClassifier:
    """A detector of arch trained for `steps` steps on batches of digits (8 vs not 8); eval mode, frozen."""
    model = detector(arch, seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    x = to_model_input(digits.x, 1)
    y = torch.from_numpy((digits.y == TARGET_DIGIT).astype(np.int64))
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        train_step(model, opt, x[idx].to(device), y[idx].to(device))
    return model.eval().requires_grad_(False)
