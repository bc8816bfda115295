"""Experiment configuration: one frozen pydantic model per stage, composed into ExperimentConfig."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from eightgen.classes import CLASS_SETS, ClassSet, DatasetName, classes_of
from eightgen.store import Location

DIGITS = tuple(range(10))
NOT_TARGET_DIGITS = (0, 1, 2, 3, 4, 5, 6, 7, 9)  # the default starts of target 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Arch = Literal["small_cnn", "resnet18", "resnet34"]
Method = Literal["seed", "gd", "pgd_linf", "pgd_l2", "min_l2"]
Loss = Literal["l1_softmax", "ce", "margin"]
Device = Literal["auto", "cpu", "cuda", "mps"]


def all_but(target: int) -> tuple[int, ...]:
    """Every class index but the target: the default start classes."""
    return tuple(d for d in DIGITS if d != target)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DatasetConfig(_Frozen):
    """Which 28x28 10-class dataset (MNIST, Fashion-MNIST), where it comes from, and how it is cut into
    train / validation / attack-start pool."""

    name: DatasetName = "mnist"
    source: Literal["auto", "hub", "idx", "local"] = "auto"
    hub_name: str | None = None  # default: the dataset's own (eightgen.classes)
    mnist_dir: Path | None = None
    local_path: Path | None = None
    target: int = Field(8, ge=0, le=9)
    valid_fraction: float = Field(0.15, gt=0.0, lt=0.9)
    # Attack-start images held out per class: a number, or "all" (every test-split image of the class).
    pool_per_digit: Annotated[int, Field(ge=1)] | Literal["all"] = 64
    balance: Literal["none", "undersample", "oversample"] = "none"
    max_train: int | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)
    # Share of each digit's non-pool images held out for the referees (never trained on by the detector).
    referee_fraction: float = Field(0.0, ge=0.0, lt=0.9)

    @model_validator(mode="after")
    def _room_for_training(self) -> "DatasetConfig":
        if self.valid_fraction + self.referee_fraction >= 0.95:
            raise ValueError(
                f"valid_fraction + referee_fraction = {self.valid_fraction + self.referee_fraction:g} leaves no training images"
            )
        return self

    @model_validator(mode="after")
    def _hub_name_fits(self) -> "DatasetConfig":
        others = {c.hub_name: c for c in CLASS_SETS.values() if c.name != self.name}
        if self.hub_name in others:
            raise ValueError(
                f"hub_name {self.hub_name!r} is the {others[self.hub_name].title} dataset, but name is {self.name!r}"
            )
        return self

    @property
    def classes(self) -> ClassSet:
        """The dataset's class names, title and Hub name."""
        return classes_of(self.name)

    @property
    def hub(self) -> str:
        """The Hub dataset in force: hub_name if given, else the dataset's own."""
        return self.hub_name or self.classes.hub_name


class TrainConfig(_Frozen):
    """How the target detector ("target vs not target") is trained with fastai."""

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
    # PGD adversarial training: every training batch is replaced by its adversarial version (pixel units).
    adversarial: Literal["none", "l2", "linf"] = "none"
    adv_eps: float | None = Field(None, gt=0)
    adv_steps: int = Field(7, gt=0)
    adv_step_size: float | None = Field(None, gt=0)  # default 2.5 * adv_eps / adv_steps
    # Radius of the 20-step PGD robust-accuracy evaluation (the training norm, L2 for standard training);
    # default: adv_eps for adversarial training, no evaluation for standard training.
    robust_eval_eps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _imagenet_needs_rgb(self) -> "TrainConfig":
        if self.normalize == "imagenet" and self.channels != 3:
            raise ValueError("normalize='imagenet' needs channels=3")
        return self

    @model_validator(mode="after")
    def _adversarial_needs_eps(self) -> "TrainConfig":
        if self.adversarial != "none" and self.adv_eps is None:
            raise ValueError(f"adversarial={self.adversarial!r} needs adv_eps (the PGD radius)")
        return self

    @property
    def radius(self) -> float:
        """The adversarial training radius: 0 for standard training."""
        return 0.0 if self.adversarial == "none" else float(self.adv_eps or 0.0)

    @property
    def robust_eval(self) -> tuple[str, float] | None:
        """(norm, eps) of the robust-accuracy evaluation in metrics.json, or None for none."""
        eps = self.robust_eval_eps if self.robust_eval_eps is not None else self.adv_eps
        if eps is None:
            return None
        return ("l2" if self.adversarial == "none" else self.adversarial), eps


class AttackConfig(_Frozen):
    """Which starts are pushed toward the target, with which method and budget."""

    # The start classes; None (the default) means every class but the target. The target is the dataset's: the config
    # that holds both (ExperimentConfig, AlignedConfig) resolves None on validation, so its dump, run label and cache
    # keys name the classes.
    start_digits: tuple[int, ...] | None = None
    include_noise: bool = True
    noise: Literal["auto", "uniform", "normal"] = "auto"
    seeds: int = Field(16, gt=0)  # noise starts, and starts per start digit unless starts_per_digit says otherwise
    # Starts per start digit (the first pool images of the digit): a number, "all" (the whole pool), or None (seeds).
    starts_per_digit: Annotated[int, Field(gt=0)] | Literal["all"] | None = None
    steps: int = Field(50, gt=0)
    method: Method = "seed"
    loss: Loss | None = None  # None: the method's default (eightgen.attack.methods)
    lr: float | None = Field(None, gt=0)  # None: the method's default step size
    eps: float | None = Field(None, gt=0)
    record_every: int = Field(5, gt=0)
    early_stop: int | None = Field(None, gt=0)
    chunk_size: int = Field(256, gt=0)
    device: Device = "auto"
    autocast_bf16: bool = False
    compile: bool = False

    @field_validator("start_digits")
    @classmethod
    def _digits_in_range(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return None
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
    def per_digit(self) -> int | Literal["all"]:
        """Starts per start digit: starts_per_digit if given, else seeds."""
        return self.starts_per_digit if self.starts_per_digit is not None else self.seeds


class ReportConfig(_Frozen):
    """What the HTML report shows."""

    title: str | None = None  # None: the report's own title, naming the dataset and the target class
    strips_per_digit: int = Field(3, ge=1)
    frames_per_strip: int = Field(8, ge=2)
    gallery_size: int = Field(8, ge=1)


def settings_label(name: str, settings: dict[str, Any]) -> str:
    """A default run name: `name` and the first 8 hex digits of the sha256 of the settings as sorted JSON."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


def safe_dir(root: Path, label: str, fallback: str) -> Path:
    """root / label, the label made filesystem-safe (`fallback` when nothing of it is left)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label).strip(".")
    return root / (safe or fallback)


class ExperimentConfig(_Frozen):
    """A whole pipeline run: dataset, detector, attack, report, and where it is written."""

    name: str = "quick"
    dataset: DatasetConfig = DatasetConfig()
    train: TrainConfig = TrainConfig()
    attack: AttackConfig = AttackConfig()
    report: ReportConfig = ReportConfig()
    runs_root: Location = Path("runs")
    cache_dir: Location = Path(".eightgen-cache")
    run_name: str | None = None

    @property
    def run_label(self) -> str:
        """The run's name: run_name if given, else the preset name and a hash of the settings."""
        if self.run_name:
            return self.run_name
        return settings_label(self.name, self.model_dump(mode="json", include={"dataset", "train", "attack", "report"}))

    @property
    def run_dir(self) -> Path:
        """Where this run's results and report are written (the name made filesystem-safe)."""
        return safe_dir(self.runs_root, self.run_label, "run")

    @model_validator(mode="before")
    @classmethod
    def _starts_of_the_target(cls, data: object) -> object:
        return resolve_starts(cls, data)

    @model_validator(mode="after")
    def _pool_holds_the_starts(self) -> "ExperimentConfig":
        check_pool(self.dataset, self.attack)
        return self


def resolve_starts(cls: type[BaseModel], data: object) -> object:
    """A config dump with its attack's start classes resolved: None is every class but the dataset's target.

    A dump written before the target had one field (attack.target beside dataset.target) is read when the two agree."""
    if not isinstance(data, dict):
        return data
    dataset = data.get("dataset", cls.model_fields["dataset"].default)
    target = dataset.target if isinstance(dataset, DatasetConfig) else dict(dataset).get("target") if isinstance(dataset, dict) else None
    target = DatasetConfig.model_fields["target"].default if target is None else target
    attack = data.get("attack", cls.model_fields["attack"].default)
    if not isinstance(attack, (dict, AttackConfig)):
        return data  # not a section at all: pydantic says so
    attack = attack.model_dump() if isinstance(attack, AttackConfig) else dict(attack)
    if "target" in attack and attack.pop("target") != target:
        raise ValueError(f"attack.target differs from dataset.target ({target}): the target is the dataset's alone")
    if attack.get("start_digits") is None and isinstance(target, int) and 0 <= target <= 9:
        attack["start_digits"] = all_but(target)
    return {**data, "attack": attack}


def check_pool(dataset: DatasetConfig, attack: AttackConfig) -> None:
    """ValueError when the attack asks for more starts per digit than the dataset holds out per digit."""
    want, have = attack.per_digit, dataset.pool_per_digit
    if attack.start_digits and isinstance(want, int) and isinstance(have, int) and want > have:
        field = "attack.starts_per_digit" if attack.starts_per_digit is not None else "attack.seeds"
        raise ValueError(
            f"{field}={want} starts per digit, but dataset.pool_per_digit holds out {have} images per digit "
            "(raise pool_per_digit, or set it to 'all')"
        )


PRESETS: dict[str, ExperimentConfig] = {
    "quick": ExperimentConfig(
        name="quick",
        # At most 8,000 training images (what the 10,000-image test set leaves), so a cold run stays under a
        # minute on 2 cores with the full 60,000-image training split too.
        dataset=DatasetConfig(max_train=8000),
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
        # Every training image (with the full MNIST: 51,000 trained, 9,000 validated), and 100 starts per class.
        dataset=DatasetConfig(pool_per_digit=100),
        train=TrainConfig(arch="small_cnn", epochs=3),
        attack=AttackConfig(seeds=100, steps=100, method="seed"),
    ),
}


class RefereeConfig(_Frozen):
    """The independent judges of an optimised image, trained on the dataset's referee split only."""

    epochs: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(128, gt=0)
    robust_eps: float = Field(3.0, gt=0)  # L2 PGD radius of the robust 10-class referee's training
    robust_steps: int = Field(7, gt=0)
    knn_k: int = Field(5, gt=0)
    eval_images: int = Field(500, ge=0)  # validation images of each referee's robust-accuracy check (0: none)
    seed: int = Field(0, ge=0)
    device: Device = "auto"


REFEREE_EPS_FACTOR = 1.5  # the robust referee's default radius over the largest detector radius (3 over the classic 2)


class AlignedConfig(_Frozen):
    """The aligned experiment: detectors trained at one or more adversarial radii (0: standard) pushed toward the target
    from identical starts, seeds and L2 budgets, every result judged by the referees."""

    name: str = "aligned"
    dataset: DatasetConfig = DatasetConfig(pool_per_digit=16, valid_fraction=0.1, referee_fraction=0.3)
    standard: TrainConfig = TrainConfig(epochs=8)
    # Every adversarially trained detector is this one at its radius; its adv_eps is the classic robust radius.
    robust: TrainConfig = TrainConfig(epochs=8, adversarial="l2", adv_eps=2.0, adv_steps=5)
    # Training radii, one detector each (0: the standard detector); None: the classic pair, 0 and robust.adv_eps.
    radii: tuple[float, ...] | None = None
    # Radius of every detector's robust-accuracy check (L2 PGD), one for all so they compare; None: robust.adv_eps.
    eval_eps: float | None = Field(None, gt=0)
    referees: RefereeConfig = RefereeConfig(epochs=6, robust_steps=5)
    # eps and (unless lr is given) the step size are set per budget: lr = step_factor * budget / steps.
    attack: AttackConfig = AttackConfig(method="pgd_l2", eps=1.0, steps=100, seeds=12, noise="uniform", record_every=10)
    budgets: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0, 8.0)
    matched_budget: float = Field(8.0, gt=0)  # the budget at which the targets are checked
    step_factor: float = Field(2.5, gt=0)
    grid_seeds: int = Field(2, ge=1)  # starts per digit in the report's image grid
    report: ReportConfig = ReportConfig()  # default title: "eightgen: does it become an 8?" (the target's name)
    runs_root: Location = Path("runs")
    cache_dir: Location = Path(".eightgen-cache")
    run_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _starts_of_the_target(cls, data: object) -> object:
        return resolve_starts(cls, data)

    @field_validator("radii")
    @classmethod
    def _radii_valid(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("no training radii (--adv-eps): give at least one (0 = the standard detector)")
        if any(r < 0 for r in v):
            raise ValueError(f"training radii (--adv-eps) must be >= 0 (0 = the standard detector), got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"training radii (--adv-eps) repeat: {list(v)}")
        return tuple(sorted(float(r) for r in v))

    @model_serializer(mode="wrap")
    def _omit_classic(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Unset radii and eval_eps are left out of every dump, so a classic experiment keeps its settings hash (its run
        # names, the diffusion experiment's and their cache entries).
        out = handler(self)
        for key in ("radii", "eval_eps"):
            if key in out and out[key] is None:
                del out[key]
        return out

    @field_validator("budgets")
    @classmethod
    def _budgets_positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(b <= 0 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"budgets must be distinct positive numbers, got {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _consistent(self) -> "AlignedConfig":
        if self.attack.method not in ("pgd_l2", "pgd_linf"):
            raise ValueError(f"attack.method must be pgd_l2 or pgd_linf (a budgeted method), got {self.attack.method!r}")
        if self.matched_budget not in self.budgets:
            raise ValueError(f"matched_budget {self.matched_budget:g} is not one of the budgets {list(self.budgets)}")
        if self.robust.adversarial == "none":
            raise ValueError("robust.adversarial must be l2 or linf (the robust detector is adversarially trained)")
        top = max(self.radii_in_force)
        if self.robust.adversarial == "l2" and self.referees.robust_eps <= top:
            which = "the robust detector's adv_eps" if self.radii is None else "the largest training radius"
            raise ValueError(
                f"referees.robust_eps ({self.referees.robust_eps:g}) must exceed {which} ({top:g}), so the referee is "
                "harder to fool than every detector (raise --referee-eps)"
            )
        if self.dataset.referee_fraction <= 0:
            raise ValueError("dataset.referee_fraction must be > 0: the referees need images no detector trained on")
        check_pool(self.dataset, self.attack)
        if self.attack.seeds < self.grid_seeds:
            raise ValueError(f"grid_seeds ({self.grid_seeds}) exceeds attack.seeds ({self.attack.seeds})")
        return self

    def attack_at(self, budget: float) -> AttackConfig:
        """The attack config of one budget: eps = budget, step size step_factor * budget / steps unless lr is set."""
        lr = self.attack.lr if self.attack.lr is not None else self.step_factor * budget / self.attack.steps
        return self.attack.model_copy(update={"eps": float(budget), "lr": lr})

    @property
    def radii_in_force(self) -> tuple[float, ...]:
        """The training radii, ascending: radii if given, else 0 and robust.adv_eps."""
        return self.radii if self.radii is not None else (0.0, float(self.robust.adv_eps or 0.0))

    @property
    def eval_radius(self) -> float:
        """The radius of every detector's robust-accuracy check: eval_eps if given, else robust.adv_eps."""
        return self.eval_eps if self.eval_eps is not None else float(self.robust.adv_eps or 0.0)

    @property
    def reference_radius(self) -> float | None:
        """The radius of the detector named "robust" (the targets'): robust.adv_eps if trained, else the largest above 0."""
        above = [r for r in self.radii_in_force if r > 0]
        if not above:
            return None
        return float(self.robust.adv_eps) if self.robust.adv_eps in above else above[-1]

    def detector_name(self, radius: float) -> str:
        """"standard" at radius 0, "robust" at the reference radius, else "robust<radius>" (robust0.25)."""
        if radius == 0:
            return "standard"
        return "robust" if radius == self.reference_radius else f"robust{radius:g}"

    @property
    def detectors(self) -> dict[str, TrainConfig]:
        """The detectors by name, ascending radius, each with its robust accuracy measured at eval_radius (L2 training).

        A robust_eval_eps equal to the detector's own adv_eps is left unset (its default), so the classic pair keeps
        its cache keys."""
        out = {}
        for r in self.radii_in_force:
            tcfg = self.standard if r == 0 else self.robust.model_copy(update={"adv_eps": r})
            if tcfg.robust_eval_eps is None and self.robust.adversarial == "l2" and r != self.eval_radius:
                tcfg = tcfg.model_copy(update={"robust_eval_eps": self.eval_radius})
            out[self.detector_name(r)] = tcfg
        return out

    @property
    def run_label(self) -> str:
        """The experiment's name: run_name if given, else name and a hash of the settings."""
        if self.run_name:
            return self.run_name
        return settings_label(self.name, self.model_dump(mode="json", exclude={"name", "runs_root", "cache_dir", "run_name"}))

    @property
    def root_dir(self) -> Path:
        """Where the experiment's run directories, aligned.html and aligned.json are written."""
        return safe_dir(self.runs_root, self.run_label, "aligned")

    def experiment(self, detector: str, budget: float) -> "ExperimentConfig":
        """The ExperimentConfig of one (detector, budget) run, so each run directory reads like any other."""
        label = f"{detector}-eps{budget:g}"
        return ExperimentConfig(
            name=f"{self.name}-{label}",
            dataset=self.dataset,
            train=self.detectors[detector],
            attack=self.attack_at(budget),
            report=self.report,
            runs_root=self.root_dir,
            cache_dir=self.cache_dir,
            run_name=label,
        )


def referee_eps_for(radii: tuple[float, ...], default: float) -> float:
    """The robust referee's radius for these training radii: the default, or REFEREE_EPS_FACTOR x the largest if that is more."""
    return max(default, REFEREE_EPS_FACTOR * max(radii, default=0.0))


SWEEP_RADII = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0)  # the robustness sweep's training radii
SWEEP_MAX_TRAIN = 8000  # its training cap: six detectors fit half an hour on 2 cores


def sweep_of(cfg: AlignedConfig, radii: tuple[float, ...] = SWEEP_RADII) -> AlignedConfig:
    """The aligned experiment as a robustness sweep: one detector per radius, the robust referee raised past the largest."""
    referees = cfg.referees.model_copy(update={"robust_eps": referee_eps_for(radii, cfg.referees.robust_eps)})
    return AlignedConfig.model_validate({**cfg.model_dump(), "radii": radii, "referees": referees.model_dump()})


class DenoiserConfig(_Frozen):
    """The denoiser: a small U-Net trained with fastai on the DDPM objective over the dataset's training split."""

    widths: tuple[int, int, int] = (32, 64, 128)  # channels at 28x28, 14x14 and 7x7
    emb_dim: int = Field(128, ge=8)
    timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear", "cosine"] = "cosine"  # ᾱ_t: DDPM's linear β, or Nichol & Dhariwal 2021's cosine
    ema_decay: float = Field(0.999, ge=0, lt=1)  # the weights kept are this moving average of the trained ones (0: none)
    epochs: int = Field(4, gt=0)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(128, gt=0)
    max_train: int | None = Field(None, gt=0)  # cap on the training images (default: the whole training split)
    valid_images: int = Field(1000, gt=0)
    seed: int = Field(0, ge=0)
    device: Device = "auto"

    @field_validator("widths")
    @classmethod
    def _widths_positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(w < 1 for w in v):
            raise ValueError(f"widths must be positive, got {list(v)}")
        return tuple(v)


Guidance = Literal["none", "standard", "robust"]


class DiffusionConfig(_Frozen):
    """Three ways to the target from identical starts: the aligned experiment's standard and robust gradient paths at
    its matched budget, and a denoiser sampled with DDIM, guided by either detector (or not) through x̂₀."""

    name: str = "diffusion"
    # The aligned experiment whose detectors, referees and gradient runs are reused (capped training split, so the
    # whole experiment fits its time on 2 cores).
    aligned: AlignedConfig = AlignedConfig(
        dataset=DatasetConfig(pool_per_digit=36, valid_fraction=0.1, referee_fraction=0.3, max_train=8000),
        # 320 noise starts and 9 x 36 digit starts: every share's exact 95% interval is at most ±6 points wide.
        attack=AttackConfig(method="pgd_l2", eps=1.0, steps=100, seeds=320, starts_per_digit=36, noise="uniform", record_every=10),
        budgets=(8.0,),
    )
    denoiser: DenoiserConfig = DenoiserConfig()
    guidance: tuple[Guidance, ...] = ("none", "standard", "robust")
    guidance_scale: float = Field(6.0, ge=0)  # L2 move of x̂₀ per step (pixel units) at full noise
    ddim_steps: int = Field(50, gt=0)
    # How far real digit starts are noised (1: pure noise): t = 899 of 1,000, ᾱ 0.024 under the cosine schedule.
    start_level: float = Field(0.9, gt=0, le=1)
    record_every: int = Field(5, gt=0)
    unguided_seeds: int = Field(320, ge=2)  # noise seeds of the one-in-ten check of unguided samples
    frechet_n: int | None = Field(None, ge=2)  # images per Fréchet sample; None: the most that every row can have
    # The judges' real-image check: held-out real images per class, as they are, blurred, and after a denoiser round trip.
    check_per_class: int = Field(300, ge=2)
    check_level: float = Field(0.5, gt=0, le=1)  # noise level of the round trip
    check_blur: float = Field(1.0, gt=0)  # Gaussian blur sigma, pixels
    chunk_size: int = Field(128, gt=0)
    device: Device = "auto"
    grid_seeds: int = Field(2, ge=1)

    @field_validator("guidance")
    @classmethod
    def _guidance_distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"guidance must name distinct detectors (none, standard, robust), got {list(v)}")
        return tuple(v)

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionConfig":
        attack = self.aligned.attack
        if not isinstance(attack.per_digit, int):
            raise ValueError("aligned.attack.starts_per_digit must be a number: every path samples the same starts")
        if self.grid_seeds > min(attack.seeds, attack.per_digit):
            raise ValueError(f"grid_seeds ({self.grid_seeds}) exceeds the starts per digit ({min(attack.seeds, attack.per_digit)})")
        counts = ([attack.seeds] if attack.include_noise else []) + ([len(attack.start_digits) * attack.per_digit] if attack.start_digits else [])
        if self.frechet_n is not None and self.frechet_n > min(counts):
            raise ValueError(f"frechet_n ({self.frechet_n}) exceeds the starts of a kind ({min(counts)}): every Fréchet row compares n images")
        if self.aligned.attack.include_noise and self.aligned.attack.noise not in ("uniform", "auto"):
            raise ValueError("aligned.attack.noise must be uniform: diffusion noise starts are the same images, mapped to Gaussian noise")
        return self

    @property
    def target(self) -> int:
        """The target digit."""
        return self.aligned.dataset.target

    @property
    def denoiser_dataset(self) -> DatasetConfig:
        """The dataset the denoiser trains on: the aligned one without its training cap (same pool and referee split)."""
        return self.aligned.dataset.model_copy(update={"max_train": self.denoiser.max_train})

    @property
    def run_label(self) -> str:
        """The experiment's name: the aligned run name if given, else name and a hash of the settings."""
        if self.aligned.run_name:
            return f"{self.aligned.run_name}-{self.name}"
        settings = self.model_dump(mode="json", exclude={"name"})
        for where in ("runs_root", "cache_dir", "run_name"):
            settings["aligned"].pop(where, None)
        return settings_label(self.name, settings)

    @property
    def run_dir(self) -> Path:
        """Where diffusion.html, diffusion.json and the samples are written (beside the aligned experiment's folder)."""
        return safe_dir(self.aligned.runs_root, self.run_label, "diffusion")
