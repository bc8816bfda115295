"""Independent referees of optimised images: 10-class digit classifiers (standard and robust) and a k-NN vote.

They are trained on the dataset's referee split only, which no detector trains or validates on. Each judges
the image as it would be shown: the channel mean, clipped to [0, 1].
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import error_rate
from fastai.torch_core import set_seed
from torch import Tensor

import eightgen
from eightgen.artifacts import Artifact, read_manifest, read_timings, write_manifest, write_timings
from eightgen.config import RefereeConfig
from eightgen.data.assembly import Assembled
from eightgen.errors import EightgenError
from eightgen.models.detector import PixelClassifier, SmallCNN, to_model_input
from eightgen.models.robust import AdversarialTraining, robust_accuracy
from eightgen.models.training import EpochReport, make_dataloaders, predict_classes

CNN_FILE = "cnn.pt"
ROBUST_FILE = "robust.pt"
KNN_FILE = "knn.npz"
INFO_FILE = "referees.json"
N_DIGITS = 10
BATCH = 1024
# The referee columns every judged results frame gets (x_final verdicts, then verdicts on the untouched start).
CLASSIFIERS = ("cnn", "robust")


@dataclass(frozen=True, eq=False)
class Referees:
    """The loaded referees: two 10-class PixelClassifiers (eval mode) and the k-NN reference images."""

    cnn: PixelClassifier
    robust: PixelClassifier
    knn_x: Tensor  # float32 [N, 784] in [0, 1]
    knn_y: Tensor  # int64 [N] digit labels
    k: int


def digit_classifier() -> PixelClassifier:
    """A fresh 10-class small CNN on one-channel [0, 1] images."""
    return PixelClassifier(SmallCNN(1, N_DIGITS), (0.0,), (1.0,))


def _fit(
    cfg: RefereeConfig, data: Assembled, device: torch.device, robust: bool, progress: Callable[[str], None] | None
) -> tuple[PixelClassifier, dict]:
    """Train one 10-class referee with fastai on the referee split; its validation error on the detector's valid split."""
    set_seed(cfg.seed + int(robust), reproducible=True)
    y_ref, y_valid = np.asarray(data.y_ref, np.int64), np.asarray(data.y_valid, np.int64)
    dls = make_dataloaders(data.x_ref, y_ref, data.x_valid, y_valid, 1, cfg.batch_size, device)
    model = digit_classifier()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=error_rate)
    name = "robust referee" if robust else "standard referee"
    report = None if progress is None else (lambda line: progress(f"{name}, {line}"))
    history: list[dict] = []
    cbs = [EpochReport(history, cfg.epochs, report)]
    if robust:
        cbs.append(AdversarialTraining("l2", cfg.robust_eps, cfg.robust_steps))
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(cbs):
        learn.fit_one_cycle(cfg.epochs, cfg.lr)
    seconds = time.perf_counter() - started
    model = learn.model.eval()
    x_valid = to_model_input(np.asarray(data.x_valid, np.uint8), 1)
    pred = predict_classes(model, x_valid)
    info = {"valid_error": float(np.mean(pred != y_valid)), "train_seconds": round(seconds, 3), "n_train": len(y_ref)}
    return model, info


def train_referees(
    cfg: RefereeConfig, data: Assembled, out_dir: Path, device: torch.device, progress: Callable[[str], None] | None = None
) -> Artifact:
    """Train the standard and robust 10-class referees, store the k-NN references; write them with a manifest."""
    if data.x_ref is None or len(data.x_ref) == 0:
        raise EightgenError("the dataset has no referee split: assemble it with referee_fraction > 0")
    missing = sorted(set(range(N_DIGITS)) - set(np.unique(data.y_ref).tolist()))
    if missing:
        raise EightgenError(f"the referee split holds no images of digit(s) {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cnn, cnn_info = _fit(cfg, data, device, False, progress)
    robust, robust_info = _fit(cfg, data, device, True, progress)
    x_valid = to_model_input(np.asarray(data.x_valid, np.uint8), 1)
    for model, info in ((cnn, cnn_info), (robust, robust_info)):
        if cfg.eval_images:
            y_eval = np.asarray(data.y_valid)[: cfg.eval_images]
            info["pgd_l2"] = robust_accuracy(model, x_valid[: cfg.eval_images], y_eval, norm="l2", eps=cfg.robust_eps)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / (CNN_FILE if model is cnn else ROBUST_FILE))
    np.savez_compressed(out_dir / KNN_FILE, x=np.asarray(data.x_ref, np.uint8), y=np.asarray(data.y_ref, np.uint8))
    refs = Referees(cnn, robust, *_knn_tensors(np.asarray(data.x_ref), np.asarray(data.y_ref)), cfg.knn_k)
    knn_error = _knn_valid_error(refs, data, data.target)
    info = {
        "config": cfg.model_dump(mode="json"),
        "version": eightgen.__version__,
        "n_reference": int(len(data.y_ref)),
        "cnn": cnn_info,
        "robust": robust_info,
        "knn": {"k": cfg.knn_k, "valid_error_target_vs_digit": knn_error},
    }
    # Times go to timings.json, outside the manifest: the same data and settings give the same hash.
    write_timings(out_dir, {name: {"train_seconds": info[name].pop("train_seconds")} for name in ("cnn", "robust")})
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return write_manifest(out_dir, {"kind": "referees", "target": int(data.target)}, [CNN_FILE, ROBUST_FILE, KNN_FILE, INFO_FILE])


def _knn_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))


def _knn_valid_error(refs: Referees, data: Assembled, target: int) -> float:
    """Error of the target-vs-digit k-NN vote on the validation images of the target and every other digit."""
    y = np.asarray(data.y_valid, np.int64)
    x = to_model_input(np.asarray(data.x_valid, np.uint8), 1)
    versus = np.where(y == target, -1, y)  # a target image is put to the vote against no digit in particular
    share, _ = knn_vote(x, versus, refs.knn_x, refs.knn_y, target=target, k=refs.k)
    return float(np.mean((share > 0.5) != (y == target)))


def read_info(directory: Path) -> dict:
    """The referees' training facts (referees.json of the referees artifact), with their training times when known."""
    try:
        info = json.loads((Path(directory) / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EightgenError(f"{Path(directory) / INFO_FILE}: unreadable ({type(exc).__name__})") from None
    for name, timings in read_timings(directory).items():
        if isinstance(info.get(name), dict) and isinstance(timings, dict):
            info[name] = {**info[name], **timings}
    return info


def load_referees(directory: Path, device: torch.device) -> Referees:
    """The referees in a directory written by train_referees (verified against its manifest)."""
    directory = Path(directory)
    read_manifest(directory)
    info = json.loads((directory / INFO_FILE).read_text())
    models = []
    for name in (CNN_FILE, ROBUST_FILE):
        model = digit_classifier()
        model.load_state_dict(torch.load(directory / name, map_location="cpu", weights_only=True))
        models.append(model.to(device).eval().requires_grad_(False))
    with np.load(directory / KNN_FILE) as npz:
        knn_x, knn_y = _knn_tensors(npz["x"], npz["y"])
    return Referees(models[0], models[1], knn_x, knn_y, int(info["config"]["knn_k"]))


def as_shown(x: Tensor) -> Tensor:
    """Images [n, C, 28, 28] as a viewer sees them: the channel mean, clipped to [0, 1], [n, 1, 28, 28] float32 on the CPU."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim != 4 or x.shape[2:] != (28, 28):
        raise EightgenError(f"images must be [n, C, 28, 28], got {list(x.shape)}")
    return x.mean(dim=1, keepdim=True).clamp(0.0, 1.0)


def knn_vote(
    x: Tensor, versus: np.ndarray, ref_x: Tensor, ref_y: Tensor, *, target: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Share of the target among each image's k nearest references (pixel L2), and the vote (share > 1/2).

    Image i is compared with references of the target and of digit versus[i] only; versus[i] < 0 (noise
    starts) compares it with references of every digit.
    """
    flat = as_shown(x).reshape(len(x), -1)
    versus = np.asarray(versus, dtype=np.int64)
    if len(versus) != len(flat):
        raise EightgenError(f"{len(versus)} start digits for {len(flat)} images")
    if k > len(ref_y):
        raise EightgenError(f"k = {k} neighbours but only {len(ref_y)} reference images")
    shares = np.zeros(len(flat))
    for i in range(0, len(flat), BATCH):
        d = torch.cdist(flat[i : i + BATCH].double(), ref_x.double())
        v = torch.from_numpy(versus[i : i + BATCH])[:, None]
        allowed = (ref_y[None, :] == target) | (ref_y[None, :] == v) | (v < 0)
        if bool((allowed.sum(dim=1) < k).any()):
            raise EightgenError(f"fewer than k = {k} reference images of the target and a start digit")
        nearest = d.masked_fill(~allowed, float("inf")).topk(k, dim=1, largest=False).indices
        shares[i : i + BATCH] = (ref_y[nearest] == target).double().mean(dim=1).numpy()
    return shares, shares > 0.5


@torch.no_grad()
def _classify(model: PixelClassifier, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """argmax digit and softmax probability of every class, [n] and [n, 10]."""
    device = next(model.parameters()).device
    probs = [model(x[i : i + BATCH].to(device)).softmax(dim=1).cpu() for i in range(0, len(x), BATCH)]
    p = torch.cat(probs).numpy().astype(np.float64)
    return p.argmax(axis=1), p


def verdicts(refs: Referees, x: Tensor, start_digit: np.ndarray, target: int) -> pd.DataFrame:
    """Every referee's verdict on images x [n, C, 28, 28]: p(target), argmax digit, is-target, is-start-digit."""
    shown = as_shown(x)
    start = np.asarray(start_digit, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in CLASSIFIERS:
        pred, p = _classify(getattr(refs, name), shown)
        out[f"ref_{name}_p_target"] = p[:, target]
        out[f"ref_{name}_pred"] = pred
        out[f"ref_{name}_is_target"] = pred == target
        out[f"ref_{name}_is_start"] = (pred == start) & (start >= 0)
    share, is_target = knn_vote(shown, start, refs.knn_x, refs.knn_y, target=target, k=refs.k)
    out["knn_share_target"] = share
    out["knn_is_target"] = is_target
    return pd.DataFrame(out)


def referee_columns(refs: Referees, x_final: Tensor, x0: Tensor, start_digit: np.ndarray, target: int) -> pd.DataFrame:
    """The results columns: verdicts on x_final, and the same verdicts on the untouched starts (suffix _start)."""
    final = verdicts(refs, x_final, start_digit, target)
    start = verdicts(refs, x0, start_digit, target).add_suffix("_start")
    return pd.concat([final, start], axis=1)
