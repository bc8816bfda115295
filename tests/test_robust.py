"""PGD adversarial training inside fastai: perturbed batches within the budget, and the robust metrics it reports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from pydantic import ValidationError

from eightgen.config import TrainConfig
from eightgen.data.assembly import load_assembled, save_assembled
from eightgen.models.detector import PixelClassifier, SmallCNN, load_classifier, to_model_input
from eightgen.models.robust import AdversarialTraining, pgd, robust_accuracy
from eightgen.models.training import METRICS_FILE, make_dataloaders, train

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _model(seed: int = 0) -> PixelClassifier:
    torch.manual_seed(seed)
    return PixelClassifier(SmallCNN(1, 2, widths=(4, 8, 8)), (0.0,), (1.0,)).eval()


@pytest.fixture(scope="module")
def small_dir(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture dataset cut to 320 training and 160 validation images."""
    a = load_assembled(dataset_dir)
    fields = {f"{k}_train": getattr(a, f"{k}_train")[:320] for k in "xyis"}
    fields |= {f"{k}_valid": getattr(a, f"{k}_valid")[:160] for k in "xyis"}
    out = tmp_path_factory.mktemp("small")
    save_assembled(dataclasses.replace(a, **fields), out)
    return out


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss(norm: str) -> None:
    model = _model()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    eps = 1.5 if norm == "l2" else 0.1
    adv = pgd(model, x, y, norm=norm, eps=eps, steps=10)
    d = (adv - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
    assert (size <= eps + 1e-5).all() and (size > 0).all()
    assert adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv), y, reduction="none").sum() > ce(model(x), y, reduction="none").sum()


def test_pgd_of_an_image_does_not_depend_on_its_batch() -> None:
    model = _model()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    whole = pgd(model, x, y, norm="l2", eps=1.0, steps=5, random_start=False)
    alone = pgd(model, x[:2], y[:2], norm="l2", eps=1.0, steps=5, random_start=False)
    torch.testing.assert_close(whole[:2], alone, atol=1e-5, rtol=0)


class _Watch(Callback):
    """Keeps copies of each batch's images as this callback sees them (before or after the adversarial swap)."""

    def __init__(self, order: int) -> None:
        self.order, self.train, self.valid = order, [], []

    def before_batch(self) -> None:
        (self.train if self.learn.training else self.valid).append(self.learn.xb[0].as_subclass(torch.Tensor).clone())


@pytest.mark.parametrize("norm, eps", [("l2", 2.0), ("linf", 0.2)])
def test_callback_replaces_training_batches_within_eps_and_leaves_validation_clean(small_dir: Path, norm: str, eps: float) -> None:
    a = load_assembled(small_dir)
    y = (a.y_train == 8).astype(np.int64)
    yv = (a.y_valid == 8).astype(np.int64)
    dls = make_dataloaders(a.x_train[:128], y[:128], a.x_valid[:64], yv[:64], 1, 32, CPU)
    before, after = _Watch(AdversarialTraining.order - 1), _Watch(AdversarialTraining.order + 1)
    learn = Learner(dls, _model().train(), loss_func=CrossEntropyLossFlat(), cbs=[before, AdversarialTraining(norm, eps, 3), after])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert len(before.train) == len(after.train) == 4
    for clean, adv in zip(before.train, after.train):
        d = (adv - clean).flatten(1)
        size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
        assert (size <= eps + 1e-5).all()
        assert (size > 0).float().mean() > 0.9  # every image moved (bar one whose gradient vanished)
        assert adv.min() >= 0 and adv.max() <= 1
    assert len(before.valid) == len(after.valid) > 0
    for clean, seen in zip(before.valid, after.valid):
        assert torch.equal(clean, seen)


def test_robust_accuracy_is_deterministic_and_below_clean() -> None:
    model = _model()
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1).numpy()  # the model is right on every image before the attack
    first = robust_accuracy(model, x, y, norm="l2", eps=3.0, steps=5, batch_size=16)
    again = robust_accuracy(model, x, y, norm="l2", eps=3.0, steps=5, batch_size=40)
    assert first["clean_accuracy"] == 1.0
    assert first["robust_accuracy"] == again["robust_accuracy"] < 1.0
    assert first["robust_error"] == pytest.approx(1 - first["robust_accuracy"])
    assert first["step_size"] == pytest.approx(2.5 * 3.0 / 5)


@pytest.mark.slow
def test_adversarial_training_reports_robust_accuracy(small_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", adversarial="linf", adv_eps=0.1, adv_steps=2)
    train(cfg, small_dir, tmp_path / "robust")
    metrics = json.loads((tmp_path / "robust" / METRICS_FILE).read_text())
    robust = metrics["robust"]
    assert robust["norm"] == "linf" and robust["eps"] == 0.1 and robust["steps"] == 20
    assert robust["n"] == metrics["n_valid"] == 160
    assert robust["clean_accuracy"] == pytest.approx(1 - metrics["valid_error"])
    assert robust["robust_accuracy"] <= robust["clean_accuracy"]
    # The same 20-step attack on the saved model, recomputed outside training, gives the same accuracies. (Five
    # optimiser steps leave this model saying "not 8" to every image, so here robust equals clean accuracy.)
    model, _ = load_classifier(tmp_path / "robust", CPU)
    a = load_assembled(small_dir)
    again = robust_accuracy(model, to_model_input(a.x_valid, 1), (a.y_valid == 8).astype(np.int64), norm="linf", eps=0.1)
    assert again["clean_accuracy"] == robust["clean_accuracy"]
    assert again["robust_accuracy"] == pytest.approx(robust["robust_accuracy"], abs=1.5 / 160)  # one image at a near-tie


def test_standard_training_has_robust_metrics_only_when_asked(small_dir: Path, tmp_path: Path) -> None:
    plain = TrainConfig(epochs=1, batch_size=64, device="cpu")
    train(plain, small_dir, tmp_path / "plain")
    assert "robust" not in json.loads((tmp_path / "plain" / METRICS_FILE).read_text())
    asked = plain.model_copy(update={"robust_eval_eps": 1.0})
    train(asked, small_dir, tmp_path / "asked")
    robust = json.loads((tmp_path / "asked" / METRICS_FILE).read_text())["robust"]
    assert robust["norm"] == "l2" and robust["eps"] == 1.0 and robust["steps"] == 20 and robust["n"] == 160


def test_adversarial_training_needs_a_radius() -> None:
    with pytest.raises(ValidationError, match="adv_eps"):
        TrainConfig(adversarial="l2")
    assert TrainConfig().adversarial == "none" and TrainConfig().robust_eval is None
    assert TrainConfig(adversarial="l2", adv_eps=2.0).robust_eval == ("l2", 2.0)
