"""Experiment configuration: one frozen pydantic model per stage, composed into ExperimentConfig."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DIGITS = tuple(range(10))
NOT_TARGET_DIGITS = (0, 1, 2, 3, 4, 5, 6, 7, 9)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Arch = Literal["small_cnn", "resnet18", "resnet34"]
Method = Literal["seed", "gd", "pgd_linf", "pgd_l2", "min_l2"]
Loss = Literal["l1_softmax", "ce", "margin"]
Device = Literal["auto", "cpu", "cuda", "mps"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetConfig(_Frozen):
    """Where MNIST comes from and how it is cut into train / validation / attack-start pool."""

    source: Literal["auto", "hub", "idx", "local"] = "auto"
    hub_name: str = "ylecun/mnist"
    mnist_dir: Path | None = None
    local_path: Path | None = None
    target: int = Field(8, ge=0, le=9)
    valid_fraction: float = Field(0.15, gt=0.0, lt=0.9)
    pool_per_digit: int = Field(64, ge=1)
    balance: Literal["none", "undersample", "oversample"] = "none"
    max_train: int | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)


class TrainConfig(_Frozen):
    """How the 8-detector is trained with fastai."""

    arch: Arch = "small_cnn"
    channels: Literal[1, 3] = 1
    normalize: Literal["none", "imagenet"] = "none"
    pretrained: bool = False
    epochs: int = Field(2, gt=0)
    fine_tune: bool = False
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(128, gt=0)
    seed: int = Field(0, ge=0)
    device: Device = "auto"

    @model_validator(mode="after")
    def _imagenet_needs_rgb(self) -> "TrainConfig":
        if self.normalize == "imagenet" and self.channels != 3:
            raise ValueError("normalize='imagenet' needs channels=3")
        return self


class AttackConfig(_Frozen):
    """Which starts are pushed toward the target, with which method and budget."""

    target: int = Field(8, ge=0, le=9)
    start_digits: tuple[int, ...] = NOT_TARGET_DIGITS
    include_noise: bool = True
    noise: Literal["auto", "uniform", "normal"] = "auto"
    seeds: int = Field(16, gt=0)
    steps: int = Field(50, gt=0)
    method: Method = "seed"
    loss: Loss | None = None
    lr: float | None = Field(None, gt=0)
    eps: float | None = Field(None, gt=0)
    record_every: int = Field(5, gt=0)
    early_stop: int | None = Field(None, gt=0)
    chunk_size: int = Field(256, gt=0)
    device: Device = "auto"
    autocast_bf16: bool = False
    compile: bool = False

    @field_validator("start_digits")
    @classmethod
    def _digits_in_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [d for d in v if not 0 <= d <= 9]
        if bad:
            raise ValueError(f"start digits must be 0-9, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"start digits repeat: {list(v)}")
        return tuple(v)

    @model_validator(mode="after")
    def _needs_some_start(self) -> "AttackConfig":
        if not self.start_digits and not self.include_noise:
            raise ValueError("no starts: give start_digits or include_noise")
        if self.method in ("pgd_linf", "pgd_l2") and self.eps is None:
            raise ValueError(f"method {self.method!r} needs eps (its budget)")
        return self

    @property
    def step_size(self) -> float:
        """The step size in force: lr if given, else the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def loss_name(self) -> Loss:
        """The loss in force: loss if given, else the method's default."""
        return self.loss if self.loss is not None else DEFAULT_LOSS[self.method]


DEFAULT_LR: dict[str, float] = {"seed": 1.0, "gd": 1.0, "pgd_linf": 0.02, "pgd_l2": 0.25, "min_l2": 0.5}
DEFAULT_LOSS: dict[str, str] = {"seed": "l1_softmax", "gd": "l1_softmax", "pgd_linf": "ce", "pgd_l2": "ce", "min_l2": "margin"}


class ReportConfig(_Frozen):
    """What the HTML report shows."""

    title: str = "eightgen report"
    strips_per_digit: int = Field(3, ge=1)
    frames_per_strip: int = Field(8, ge=2)
    gallery_size: int = Field(8, ge=1)


class ExperimentConfig(_Frozen):
    """A whole pipeline run: dataset, detector, attack, report, and where it is written."""

    name: str = "quick"
    dataset: DatasetConfig = DatasetConfig()
    train: TrainConfig = TrainConfig()
    attack: AttackConfig = AttackConfig()
    report: ReportConfig = ReportConfig()
    runs_root: Path = Path("runs")
    cache_dir: Path = Path(".eightgen-cache")
    run_name: str | None = None

    @property
    def run_label(self) -> str:
        """The run's name: run_name if given, else the preset name and a hash of the settings."""
        if self.run_name:
            return self.run_name
        settings = self.model_dump(mode="json", include={"dataset", "train", "attack", "report"})
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"

    @property
    def run_dir(self) -> Path:
        """Where this run's results and report are written (the name made filesystem-safe)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.run_label).strip(".")
        return self.runs_root / (safe or "run")

    @model_validator(mode="after")
    def _same_target(self) -> "ExperimentConfig":
        if self.attack.target != self.dataset.target:
            raise ValueError(
                f"attack.target ({self.attack.target}) differs from dataset.target ({self.dataset.target})"
            )
        return self


PRESETS: dict[str, ExperimentConfig] = {
    "quick": ExperimentConfig(
        name="quick",
        train=TrainConfig(arch="small_cnn", epochs=2),
        attack=AttackConfig(seeds=8, steps=50, method="seed"),
    ),
    "seed": ExperimentConfig(
        name="seed",
        train=TrainConfig(
            arch="resnet34", channels=3, normalize="imagenet", pretrained=True, epochs=5, fine_tune=True, lr=2e-3
        ),
        attack=AttackConfig(seeds=16, steps=50, method="seed"),
    ),
    "full": ExperimentConfig(
        name="full",
        train=TrainConfig(arch="resnet18", epochs=5),
        attack=AttackConfig(seeds=64, steps=100, method="seed"),
    ),
}
