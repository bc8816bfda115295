"""Training the target detector (target class vs the rest) with fastai and writing its model artifact directory."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle and fine_tune)
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import error_rate
from fastai.torch_core import TensorCategory, TensorImage, params, set_seed, trainable_params
from fastcore.foundation import L
from torch import Tensor

import eightgen
from eightgen.artifacts import MANIFEST, Artifact, fresh_sibling, put_in_place, remove_staging, sha256_file, write_manifest, write_timings
from eightgen.store import local
from eightgen.config import TrainConfig
from eightgen.data.assembly import binary_labels, load_assembled
from eightgen.devices import pick_device
from eightgen.errors import EightgenError
from eightgen.models.detector import (
    METRICS_FILE,
    MODEL_FILE,
    SPEC_FILE,
    ModelSpec,
    PixelClassifier,
    classifier_for,
    save_classifier,
    spec_for,
    to_model_input,
)
from eightgen.models.robust import adversarial_callbacks, robust_metrics

LEARNER_FILE = "learner.pkl"
PREDICT_BATCH = 1024


class PixelDataset(torch.utils.data.Dataset):
    """uint8 images with binary labels, served as (TensorImage uint8 [C,28,28], TensorCategory) items."""

    def __init__(self, x: np.ndarray, y: np.ndarray, channels: int) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).unsqueeze(1)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.channels = channels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[TensorImage, TensorCategory]:
        return TensorImage(self.x[i].expand(self.channels, -1, -1)), TensorCategory(self.y[i])

    def new_empty(self) -> "PixelDataset":
        """An empty dataset of the same kind (what Learner.export keeps)."""
        return PixelDataset(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), self.channels)


def make_dataloaders(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    channels: int,
    batch_size: int,
    device: torch.device,
) -> DataLoaders:
    """fastai DataLoaders of pixel tensors in [0,1] (uint8 scaled on the device) and binary labels."""

    def loader(x: np.ndarray, y: np.ndarray, train: bool) -> TfmdDL:
        return TfmdDL(
            PixelDataset(x, y, channels),
            bs=batch_size,
            shuffle=train,
            drop_last=train and len(y) > batch_size,
            num_workers=0,
            after_batch=[IntToFloatTensor()],
            device=device,
        )

    return DataLoaders(loader(x_train, y_train, True), loader(x_valid, y_valid, False), device=device)


def split_resnet(model: PixelClassifier) -> list:
    """fastai parameter groups of a wrapped resnet: stem and early layers, late layers, head."""
    body, head = model.net[0], model.net[1:]
    return L(body[:6], body[6:], head).map(params)


class EpochReport(Callback):
    """Collects each epoch's losses and metrics and passes a one-line summary to `report` ("<what>epoch 2/5: ...").

    `batches(done, total)`, if given, hears of every training batch, counted over all `total` epochs.
    """

    order = Recorder.order + 1  # after the Recorder has the epoch's losses

    def __init__(
        self,
        history: list[dict],
        total: int,
        report: Callable[[str], None] | None,
        batches: Callable[[int, int], None] | None = None,
        what: str = "",
    ) -> None:
        self.history, self.total, self.report, self.batches, self.what = history, total, report, batches, what
        self.started = time.perf_counter()

    def before_epoch(self) -> None:
        self.started = time.perf_counter()

    def after_batch(self) -> None:
        if self.batches is not None and self.training:
            self.batches(len(self.history) * self.n_iter + self.iter + 1, self.total * self.n_iter)

    def after_epoch(self) -> None:
        names = [n for n in self.recorder.metric_names[1:] if n != "time"]
        row = {"epoch": len(self.history) + 1}
        row.update({n: float(v) for n, v in zip(names, self.learn.final_record)})
        row["seconds"] = round(time.perf_counter() - self.started, 3)
        self.history.append(row)
        if self.report is not None:
            values = " ".join(f"{n} {row[n]:.4f}" for n in names)
            self.report(f"{self.what}epoch {row['epoch']}/{self.total}: {values} ({row['seconds']:.1f}s)")


def make_learner(cfg: TrainConfig, spec: ModelSpec, dls: DataLoaders) -> Learner:
    """A fastai Learner around a fresh PixelClassifier; resnets get vision_learner's splits and freezing."""
    model = classifier_for(spec, pretrained=cfg.pretrained)
    resnet = spec.arch.startswith("resnet")
    learn = Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=error_rate,
        splitter=split_resnet if resnet else trainable_params,
    )
    if resnet and cfg.pretrained:
        learn.freeze()
    return learn


@torch.no_grad()
def predict_classes(model: torch.nn.Module, x: Tensor, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """argmax class of each pixel-space image, computed in eval mode on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def evaluation(pred: np.ndarray, y_binary: np.ndarray, digits: np.ndarray) -> dict:
    """Validation error, confusion [[tn, fp], [fn, tp]] and error per true digit."""
    confusion = [[int(np.sum((y_binary == t) & (pred == p))) for p in (0, 1)] for t in (0, 1)]
    wrong = pred != y_binary
    by_digit = {str(d): float(wrong[digits == d].mean()) for d in range(10) if np.any(digits == d)}
    return {"valid_error": float(wrong.mean()), "confusion": confusion, "valid_error_by_digit": by_digit}


def _check_labels(y_train: np.ndarray, y_valid: np.ndarray, target: int, dataset_dir: Path) -> None:
    positives = int(y_train.sum())
    if positives == 0:
        raise EightgenError(f"{dataset_dir}: the training split holds no {target}s: nothing to learn the target from")
    if positives == len(y_train):
        raise EightgenError(f"{dataset_dir}: the training split holds only {target}s: nothing to tell them from")
    if len(y_valid) == 0:
        raise EightgenError(f"{dataset_dir}: the validation split is empty")


class _ExportPickler(cloudpickle.Pickler):
    """fastai's export pickler, with every random.Random written as a fresh Random(0): the exported loaders'
    generators hold whatever else in the process last drew random numbers (Prefect does), not the training."""

    def reducer_override(self, obj: object) -> object:
        if type(obj) is random.Random:
            return random.Random, (0,)
        return super().reducer_override(obj)


def export_learner(learn: Learner, path: Path) -> None:
    """Export the fastai learner so the same training gives the same bytes: no wall-clock times, no stray generator state."""
    recorder = learn.recorder
    if getattr(recorder, "add_time", False):
        recorder.start_epoch = 0.0
        if getattr(recorder, "log", None):
            recorder.log = [*recorder.log[:-1], ""]
    learn.export(path, pickle_module=SimpleNamespace(__name__="eightgen-export", Pickler=_ExportPickler))


def train(
    cfg: TrainConfig,
    dataset_dir: Path,
    out_dir: Path,
    progress: Callable[[str], None] | None = None,
    batches: Callable[[int, int], None] | None = None,
    stamp: dict[str, Any] | None = None,
) -> Artifact:
    """Train the detector on an assembled dataset; write learner.pkl, model.pt, spec.json, metrics.json, manifest.

    `progress` gets one line per epoch; `batches(done, total)` hears of every training batch of all epochs; `stamp`'s
    fields go into the manifest. `out_dir` may be a store URL.
    """
    dataset_dir = Path(dataset_dir)
    data = load_assembled(dataset_dir)
    target = int(data.target)
    y_train = np.asarray(binary_labels(data.y_train, target), dtype=np.int64)
    y_valid = np.asarray(binary_labels(data.y_valid, target), dtype=np.int64)
    _check_labels(y_train, y_valid, target, dataset_dir)
    device = pick_device(cfg.device)
    spec = spec_for(cfg, target)

    set_seed(cfg.seed, reproducible=True)
    dls = make_dataloaders(data.x_train, y_train, data.x_valid, y_valid, cfg.channels, cfg.batch_size, device)
    learn = make_learner(cfg, spec, dls)
    history: list[dict] = []
    total = cfg.epochs + (1 if cfg.fine_tune else 0)
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs([EpochReport(history, total, progress, batches), *adversarial_callbacks(cfg)]):
        if cfg.fine_tune:
            learn.fine_tune(cfg.epochs, base_lr=cfg.lr)
        else:
            learn.fit_one_cycle(cfg.epochs, cfg.lr)
    train_seconds = time.perf_counter() - started

    model: PixelClassifier = learn.model
    x_valid = to_model_input(np.asarray(data.x_valid, dtype=np.uint8), cfg.channels)
    pred = predict_classes(model, x_valid)
    metrics = evaluation(pred, y_valid, np.asarray(data.y_valid))
    # Times go to timings.json, outside the manifest: the same data and settings give the same model hash.
    timings = {"train_seconds": round(train_seconds, 3), "epoch_seconds": [row.pop("seconds") for row in history]}
    metrics.update(n_train=int(len(y_train)), n_valid=int(len(y_valid)), epochs=len(history), history=history)
    metrics.update(robust_metrics(cfg, model, x_valid, y_valid))

    tmp = fresh_sibling(local(out_dir), "partial")
    try:
        save_classifier(model, spec, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        export_learner(learn, tmp.resolve() / LEARNER_FILE)
        write_timings(tmp, timings)
        meta = {
            "kind": "model",
            "version": eightgen.__version__,
            "train_config": cfg.model_dump(mode="json"),
            "spec": spec.model_dump(mode="json"),
            "dataset": {"path": str(dataset_dir), "sha256": sha256_file(dataset_dir / MANIFEST)},
            "valid_error": metrics["valid_error"],
            "device": str(device),
            **(stamp or {}),
        }
        written = write_manifest(tmp, meta, [LEARNER_FILE, MODEL_FILE, SPEC_FILE, METRICS_FILE])
        put_in_place(tmp, out_dir)
    except BaseException:
        remove_staging(tmp)
        raise
    return Artifact(path=out_dir, sha256=written.sha256)

