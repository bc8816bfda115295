"""Training the detector with fastai on real MNIST and the model artifact it writes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.learner import load_learner
from helpers import Trained

from eightgen.artifacts import MANIFEST, read_manifest, sha256_file
from eightgen.config import IMAGENET_MEAN, TrainConfig
from eightgen.data.assembly import load_assembled, save_assembled
from eightgen.errors import EightgenError
from eightgen.models.detector import (
    PixelClassifier,
    load_classifier,
    read_metrics,
    to_model_input,
)
from eightgen.models.training import LEARNER_FILE, METRICS_FILE, train

CPU = torch.device("cpu")
FILES = {LEARNER_FILE, "model.pt", "spec.json", METRICS_FILE}
QUICK = TrainConfig(arch="small_cnn", epochs=1, batch_size=32, seed=0, device="cpu")
TINY = (128, 64)  # training and validation images of the cut-down dataset for the slower checks


@pytest.fixture(scope="module")
def trained(small_cnn: Trained) -> Trained:
    """The session's small CNN (trained with QUICK), with its progress lines and stdout."""
    assert small_cnn.cfg == QUICK
    return small_cnn


def _load_learner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai warns that pickles can run code; this one is our own
        return load_learner(path)


def _subset(src: Path, dst: Path, n_train: int, n_valid: int, drop_target_from_train: bool = False) -> Path:
    """A smaller dataset artifact cut from an assembled one (optionally with no target in train)."""
    a = load_assembled(src)
    keep = np.flatnonzero(a.y_train != a.target) if drop_target_from_train else np.arange(len(a.y_train))
    keep = keep[:n_train]
    fields = {f"{k}_train": getattr(a, f"{k}_train")[keep] for k in "xyis"}
    fields |= {f"{k}_valid": getattr(a, f"{k}_valid")[:n_valid] for k in "xyis"}
    save_assembled(dataclasses.replace(a, **fields), dst)
    return dst


@pytest.fixture(scope="module")
def tiny_dir(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cut-down copy of the fixture dataset, for checks where what is learnt does not matter."""
    return _subset(dataset_dir, tmp_path_factory.mktemp("tiny"), n_train=TINY[0], n_valid=TINY[1])


def test_artifact_holds_every_file_with_verified_hashes(trained: Trained) -> None:
    path = trained.artifact.path
    manifest = read_manifest(path)
    assert set(manifest["files"]) == FILES
    assert trained.artifact.sha256 == sha256_file(path / MANIFEST)
    assert manifest["train_config"] == QUICK.model_dump(mode="json")
    assert manifest["spec"]["arch"] == "small_cnn"
    assert {p.name for p in path.parent.iterdir()} == {path.name}, "temporary directories were left behind"


def test_trained_model_clearly_beats_always_saying_not_8(trained: Trained, dataset_dir: Path) -> None:
    data = load_assembled(dataset_dir)
    baseline = float(np.mean(data.y_valid == data.target))  # error of a model that never says "8"
    metrics = json.loads((trained.artifact.path / METRICS_FILE).read_text())
    assert 0.05 < baseline < 0.15
    assert metrics["valid_error"] < baseline / 3


def test_metrics_are_consistent_with_the_validation_split(trained: Trained, dataset_dir: Path) -> None:
    data = load_assembled(dataset_dir)
    metrics = json.loads((trained.artifact.path / METRICS_FILE).read_text())
    (tn, fp), (fn, tp) = metrics["confusion"]
    n_valid = len(data.y_valid)
    assert metrics["n_valid"] == n_valid and tn + fp + fn + tp == n_valid
    assert metrics["n_train"] == len(data.y_train)
    assert fn + tp == int(np.sum(data.y_valid == data.target))
    assert metrics["valid_error"] == pytest.approx((fp + fn) / n_valid)
    by_digit = metrics["valid_error_by_digit"]
    assert set(by_digit) == {str(d) for d in range(10)}
    wrong = sum(err * np.sum(data.y_valid == int(d)) for d, err in by_digit.items())
    assert wrong == pytest.approx(fp + fn)
    assert by_digit["8"] == pytest.approx(fn / (fn + tp))
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1
    last = metrics["history"][-1]
    assert set(last) >= {"epoch", "train_loss", "valid_loss", "error_rate"}
    assert last["error_rate"] == pytest.approx(metrics["valid_error"], abs=0.5 / n_valid)
    assert "train_seconds" not in metrics and read_metrics(trained.artifact.path)["train_seconds"] > 0  # timed outside the hash


def test_progress_gets_one_line_per_epoch_and_nothing_is_printed(trained: Trained) -> None:
    assert len(trained.lines) == 1
    assert trained.lines[0].startswith("epoch 1/1: train_loss ")
    assert "error_rate" in trained.lines[0]
    assert trained.stdout == ""


def test_exported_learner_predicts_like_model_pt(trained: Trained, dataset_dir: Path) -> None:
    learn = _load_learner(trained.artifact.path / LEARNER_FILE)
    model, spec = load_classifier(trained.artifact.path, CPU)
    assert isinstance(learn.model, PixelClassifier)
    x = to_model_input(load_assembled(dataset_dir).x_valid[:256], spec.channels)
    learn.model.eval()
    with torch.no_grad():
        assert torch.equal(learn.model(x), model(x))


@pytest.mark.slow
def test_exported_learner_loads_in_a_fresh_process(trained: Trained) -> None:
    code = (
        "import sys, warnings; warnings.simplefilter('ignore');"
        "from fastai.learner import load_learner;"
        "learn = load_learner(sys.argv[1]);"
        "print(type(learn.model).__name__, learn.model(__import__('torch').zeros(2, 1, 28, 28)).shape[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(trained.artifact.path / LEARNER_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["PixelClassifier", "2"]


def test_training_is_deterministic_for_a_seed(tiny_dir: Path, tmp_path: Path) -> None:
    first, second = (train(QUICK, tiny_dir, tmp_path / name).path / "model.pt" for name in ("a", "b"))
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(QUICK.model_copy(update={"seed": 1}), tiny_dir, tmp_path / "c").path / "model.pt"
    c = torch.load(other, weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resnet_fine_tune_with_imagenet_normalisation(tiny_dir: Path, tmp_path: Path) -> None:
    tiny = tiny_dir
    cfg = TrainConfig(
        arch="resnet18", channels=3, normalize="imagenet", fine_tune=True, epochs=1, batch_size=64, device="cpu"
    )
    out = tmp_path / "resnet"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    lines: list[str] = []
    artifact = train(cfg, tiny, out, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert not (out / "stale.txt").exists()
    assert set(read_manifest(out)["files"]) == FILES
    metrics = json.loads((artifact.path / METRICS_FILE).read_text())
    assert metrics["epochs"] == 2 and metrics["n_train"] == TINY[0] and metrics["n_valid"] == TINY[1]
    model, spec = load_classifier(artifact.path, CPU)
    assert (spec.arch, spec.channels, spec.normalize) == ("resnet18", 3, "imagenet")
    assert torch.allclose(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    learn = _load_learner(artifact.path / LEARNER_FILE)
    x = to_model_input(load_assembled(tiny).x_valid[:32], 3)
    learn.model.eval()
    with torch.no_grad():
        assert torch.equal(learn.model(x), model(x))


def test_dataset_without_the_target_in_train_is_refused(dataset_dir: Path, tmp_path: Path) -> None:
    no_eights = _subset(dataset_dir, tmp_path / "no8", n_train=500, n_valid=200, drop_target_from_train=True)
    assert not np.any(load_assembled(no_eights).y_train == 8)
    with pytest.raises(EightgenError, match="no 8s"):
        train(QUICK, no_eights, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_failed_training_leaves_no_artifact(tiny_dir: Path, tmp_path: Path) -> None:
    def broken_progress(line: str) -> None:
        raise RuntimeError("progress sink failed")

    with pytest.raises(RuntimeError, match="progress sink failed"):
        train(QUICK, tiny_dir, tmp_path / "models" / "m", progress=broken_progress)
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())


def test_unavailable_device_is_refused_before_training(dataset_dir: Path, tmp_path: Path) -> None:
    missing = "mps" if torch.cuda.is_available() else "cuda"  # no machine has both
    with pytest.raises(EightgenError, match=f"'{missing}'.*not available"):
        train(QUICK.model_copy(update={"device": missing}), dataset_dir, tmp_path / "model")
    assert not (tmp_path / "model").exists()
