"""Per-start losses on classifier logits: lower means closer to the target class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eightgen.errors import EightgenError

LOSS_NAMES = ("l1_softmax", "ce", "margin")


def l1_softmax(logits: Tensor, target_index: int = 1) -> Tensor:
    """mean_c |softmax(z)_c - onehot_c|: the notebook's F.l1_loss(softmax(z), onehot) of each start."""
    onehot = F.one_hot(torch.full_like(logits[:, 0], target_index, dtype=torch.long), logits.shape[1])
    return (logits.softmax(dim=1) - onehot.to(logits.dtype)).abs().mean(dim=1)


def cross_entropy(logits: Tensor, target_index: int = 1) -> Tensor:
    """-log softmax(z)_target."""
    target = torch.full_like(logits[:, 0], target_index, dtype=torch.long)
    return F.cross_entropy(logits, target, reduction="none")


def margin(logits: Tensor, target_index: int = 1) -> Tensor:
    """max_{c != target} z_c - z_target (negative once the target wins; unbounded, so it always has a direction)."""
    others = torch.cat([logits[:, :target_index], logits[:, target_index + 1 :]], dim=1)
    return others.amax(dim=1) - logits[:, target_index]


_LOSSES = {"l1_softmax": l1_softmax, "ce": cross_entropy, "margin": margin}


def per_sample_loss(name: str, logits: Tensor, target_index: int = 1) -> Tensor:
    """The loss `name` of every start: logits [n, K] -> [n] (float32; never reduced over the batch)."""
    if name not in _LOSSES:
        raise EightgenError(f"unknown loss {name!r} (expected one of {', '.join(LOSS_NAMES)})")
    if logits.ndim != 2 or not 0 <= target_index < logits.shape[1]:
        raise EightgenError(f"logits must be [n, K] with target index < K, got {list(logits.shape)}")
    return _LOSSES[name](logits.float(), target_index)
