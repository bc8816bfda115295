"""The target detector's networks, the pixel-space wrapper around them, and their files on disk."""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from eightgen.artifacts import MANIFEST, read_manifest, read_timings
from eightgen.config import IMAGENET_MEAN, IMAGENET_STD, Arch, TrainConfig
from eightgen.errors import EightgenError

MODEL_FILE = "model.pt"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
N_OUT = 2
IMAGE_SIZE = 28
WEIGHTS_PROBE_TIMEOUT_S = 5.0


class ModelSpec(BaseModel):
    """What model.pt holds: the architecture, its input channels and the normalisation inside it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    arch: Arch
    channels: Literal[1, 3]
    normalize: Literal["none", "imagenet"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target: int = Field(ge=0, le=9)
    class_names: tuple[str, str]  # (not target, target) by class index; default from target

    @model_validator(mode="before")
    @classmethod
    def _class_names_follow_target(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("class_names") is None and isinstance(data.get("target"), int):
            data = {**data, "class_names": (f"not_{data['target']}", str(data["target"]))}
        return data

    @model_validator(mode="after")
    def _stats_per_channel(self) -> "ModelSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


def spec_for(cfg: TrainConfig, target: int) -> ModelSpec:
    """The ModelSpec a training config produces for a target digit."""
    if cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.0,) * cfg.channels, (1.0,) * cfg.channels
    return ModelSpec(
        arch=cfg.arch,
        channels=cfg.channels,
        normalize=cfg.normalize,
        mean=mean,
        std=std,
        target=target,
        class_names=(f"not_{target}", str(target)),
    )


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small, fast CNN for 28x28 inputs: three conv blocks, two poolings, one linear layer to 2 logits."""

    def __init__(self, in_channels: int = 1, n_out: int = N_OUT, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_block(in_channels, w1),
            _conv_block(w1, w2),
            nn.MaxPool2d(2),
            _conv_block(w2, w3),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(w3 * 7 * 7, n_out))

    def forward(self, x: Tensor) -> Tensor:
        """Logits [n, n_out] of images [n, C, 28, 28]."""
        return self.head(self.features(x))


def _torchvision_resnet(arch: str):
    from torchvision import models as tvm

    return {
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    }[arch]


def _reachable(url: str, timeout: float) -> bool:
    """Whether a HEAD request to url answers within timeout (name lookup included)."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                answered.append(True)
        except (OSError, ValueError):
            answered.append(False)

    # urlopen's timeout does not cover DNS resolution, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answered and answered[0])


def imagenet_weights(arch: str) -> tuple[str, Path, bool]:
    """Where torchvision's ImageNet weights for a resnet come from: URL, torch hub cache file, and whether either is there."""
    url = _torchvision_resnet(arch)[1].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return url, cached, cached.is_file() or _reachable(url, WEIGHTS_PROBE_TIMEOUT_S)


def imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for a resnet, from the torch hub cache or downloaded; fails fast offline."""
    _, weights = _torchvision_resnet(arch)
    _, cached, available = imagenet_weights(arch)
    advice = (
        f"use pretrained=false, or place {cached.name} in {cached.parent} "
        "(the torch hub cache; its location follows TORCH_HOME)"
    )
    if not available:
        raise EightgenError(f"ImageNet weights for {arch} could not be fetched from {weights.url}: {advice}")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network failure mid-download, a truncated or corrupt cached file
        raise EightgenError(
            f"ImageNet weights for {arch} could not be loaded ({type(exc).__name__}: {exc}): {advice}"
        ) from None


def _resnet(arch: str, channels: int, pretrained: bool) -> nn.Module:
    """A torchvision resnet with fastai's vision_learner body cut and head, 2 outputs, `channels` inputs."""
    from fastai.vision.learner import add_head, create_body, num_features_model

    ctor, _ = _torchvision_resnet(arch)
    net = ctor(weights=None)
    if pretrained:
        net.load_state_dict(imagenet_state_dict(arch))
    # For channels=1 fastai rebuilds conv1; with pretrained weights it sums them over the RGB inputs.
    body = create_body(net, n_in=channels, pretrained=pretrained, cut=-2)
    return add_head(body, num_features_model(nn.Sequential(*body.children())), N_OUT)


def build_network(arch: str, channels: int, pretrained: bool = False) -> nn.Module:
    """The raw network (normalised input -> 2 logits) for "small_cnn", "resnet18" or "resnet34"."""
    if channels not in (1, 3):
        raise EightgenError(f"channels must be 1 or 3, got {channels}")
    if arch == "small_cnn":
        if pretrained:
            raise EightgenError("small_cnn has no pretrained weights: use pretrained=false or a resnet arch")
        return SmallCNN(channels)
    if arch in ("resnet18", "resnet34"):
        return _resnet(arch, channels, pretrained)
    raise EightgenError(f"unknown arch {arch!r} (use small_cnn, resnet18 or resnet34)")


class PixelClassifier(nn.Module):
    """A network taking pixel-space images ([0,1] scale): forward(x) = net((x - mean) / std) -> logits [n, 2]."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise EightgenError(f"mean has {len(mean)} values but std has {len(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits [n, 2] of pixel-space images [n, C, 28, 28]."""
        return self.net((x - self.mean) / self.std)


def classifier_for(spec: ModelSpec, pretrained: bool = False) -> PixelClassifier:
    """A fresh PixelClassifier built as spec describes."""
    return PixelClassifier(build_network(spec.arch, spec.channels, pretrained), spec.mean, spec.std)


def to_model_input(x: np.ndarray, channels: int) -> Tensor:
    """uint8 images [N, 28, 28] -> float32 [N, C, 28, 28] in [0, 1], grey repeated for 3 channels."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise EightgenError(f"images must be a uint8 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise EightgenError(f"images must have shape [N, 28, 28], got {list(x.shape)}")
    if channels not in (1, 3):
        raise EightgenError(f"channels must be 1 or 3, got {channels}")
    pixels = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0).unsqueeze(1)
    return pixels.expand(-1, channels, -1, -1).contiguous()


def save_classifier(model: PixelClassifier, spec: ModelSpec, directory: Path) -> None:
    """Write model.pt (the PixelClassifier's state_dict, on cpu) and spec.json into directory."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def read_metrics(directory: Path) -> dict:
    """The validation metrics in a model directory's metrics.json, with its training time (timings.json) when known."""
    path = directory / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise EightgenError(f"{path}: missing (not a model directory?)") from None
    except json.JSONDecodeError as exc:
        raise EightgenError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise EightgenError(f"{path}: expected a JSON object")
    return {**metrics, **read_timings(directory)}


def read_spec(directory: Path) -> ModelSpec:
    """The ModelSpec in a model directory's spec.json."""
    path = directory / SPEC_FILE
    if not path.is_file():
        raise EightgenError(f"{path}: missing (not a model directory?)")
    try:
        return ModelSpec.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise EightgenError(f"{path}: corrupt JSON ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise EightgenError(f"{path}: invalid model spec ({where}: {first['msg']})") from None


def _mismatch(model: nn.Module, state: dict, path: Path, spec: ModelSpec) -> str | None:
    """A one-line account of how a state_dict differs from the model's, or None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if not (missing or unexpected or reshaped):
        return None
    example = (missing or unexpected or reshaped)[0]
    return (
        f"{path}: weights do not fit spec.json (arch={spec.arch}, channels={spec.channels}): "
        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} differently shaped tensors "
        f"(e.g. {example!r})"
    )


def load_classifier(model_dir: Path, device: torch.device) -> tuple[PixelClassifier, ModelSpec]:
    """The PixelClassifier in a model directory (eval mode, parameters frozen) and its ModelSpec."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EightgenError(f"{model_dir}: model directory not found")
    if (model_dir / MANIFEST).is_file():
        read_manifest(model_dir)
    spec = read_spec(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise EightgenError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a torch archive
        raise EightgenError(f"{path}: not a readable torch state_dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EightgenError(f"{path}: holds a {type(state).__name__}, not a state_dict of tensors")
    model = classifier_for(spec)
    problem = _mismatch(model, state, path, spec)
    if problem:
        raise EightgenError(problem)
    model.load_state_dict(state)
    same_stats = torch.allclose(model.mean.flatten(), torch.tensor(spec.mean)) and torch.allclose(
        model.std.flatten(), torch.tensor(spec.std)
    )
    if not same_stats:
        raise EightgenError(f"{path}: its mean/std buffers differ from spec.json's ({spec.mean}, {spec.std})")
    return model.to(device).eval().requires_grad_(False), spec
