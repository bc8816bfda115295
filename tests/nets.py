"""Networks for engine tests: fresh architectures with non-trivial batch-norm statistics."""

from __future__ import annotations

import torch
from torch import nn

from eightgen.models.detector import build_network


def bn_net(arch: str, seed: int = 0) -> nn.Module:
    """An eval-mode network whose batch norms hold non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    net = build_network(arch, 1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval().requires_grad_(False)
