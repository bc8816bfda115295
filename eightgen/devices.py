"""Choosing the torch device a stage runs on."""

from __future__ import annotations

import torch

from eightgen.errors import EightgenError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for a config's device name: "auto" takes cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise EightgenError(f"unknown device {name!r} (use auto, cpu, cuda or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EightgenError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EightgenError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise EightgenError(f"device {name!r} requested but MPS is not available on this machine")
        return device
    raise EightgenError(f"unsupported device {name!r} (use auto, cpu, cuda or mps)")
