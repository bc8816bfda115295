"""Failure indicators that need the model itself: dead-unit collapse at the final image."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from eightgen.errors import EightgenError

BATCH = 1024


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear in module order (the layer that maps features to logits)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EightgenError(f"{type(model).__name__} has no nn.Linear layer to watch for dead-unit collapse")
    return linears[-1]


@torch.no_grad()
def collapsed(model: nn.Module, x: Tensor | np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """Per image: is the input of the model's last linear layer all zeros (its logits are just that layer's bias)?

    That is dead-unit collapse: every unit feeding the logits is silent, so the prediction no longer depends on
    the image and the input gradient is zero. Measured with a forward hook, the model in eval mode.
    """
    layer = last_linear(model)
    x = torch.as_tensor(x, dtype=torch.float32)
    device = next(model.parameters()).device
    seen: list[Tensor] = []
    hook = layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    training = model.training
    model.eval()
    try:
        out = np.zeros(len(x), dtype=bool)
        for i in range(0, len(x), batch_size):
            seen.clear()
            model(x[i : i + batch_size].to(device))
            features = seen[-1].flatten(1)
            out[i : i + batch_size] = (features == 0).all(dim=1).cpu().numpy()
        return out
    finally:
        hook.remove()
        model.train(training)
