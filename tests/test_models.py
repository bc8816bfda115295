"""Networks, the pixel-space classifier, model files on disk, and device choice."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from eightgen.artifacts import write_manifest
from eightgen.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig
from eightgen.devices import pick_device
from eightgen.errors import EightgenError
from eightgen.models.detector import (
    MODEL_FILE,
    SPEC_FILE,
    WEIGHTS_PROBE_TIMEOUT_S,
    ModelSpec,
    PixelClassifier,
    SmallCNN,
    build_network,
    classifier_for,
    load_classifier,
    save_classifier,
    spec_for,
    to_model_input,
)

CPU = torch.device("cpu")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and every HTTP(S) request sent to a proxy port nothing listens on."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.install_opener(None)  # urllib caches its opener, and with it the proxy settings
    yield home
    urllib.request.install_opener(None)


def _pixels(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "resnet34"])
@pytest.mark.parametrize("channels", [1, 3])
def test_networks_give_two_logits_per_image(arch: str, channels: int) -> None:
    net = build_network(arch, channels, pretrained=False).eval()
    with torch.no_grad():
        out = net(_pixels(5, channels))
    assert out.shape == (5, 2)
    assert torch.isfinite(out).all()


def test_small_cnn_is_small() -> None:
    n_params = sum(p.numel() for p in SmallCNN(1).parameters())
    resnet_params = sum(p.numel() for p in build_network("resnet18", 1).parameters())
    assert n_params < resnet_params / 50


def test_unknown_arch_and_channels_are_rejected() -> None:
    with pytest.raises(EightgenError, match=r"unknown arch 'vgg' \(use small_cnn, resnet18 or resnet34\)"):
        build_network("vgg", 1)
    with pytest.raises(EightgenError, match="channels must be 1 or 3, got 2"):
        build_network("small_cnn", 2)


def test_small_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(EightgenError, match="small_cnn.*pretrained=false"):
        build_network("small_cnn", 1, pretrained=True)


def test_pretrained_resnet_offline_fails_fast_and_says_what_to_do(offline: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(EightgenError) as info:
        build_network("resnet18", 3, pretrained=True)
    assert time.perf_counter() - started < WEIGHTS_PROBE_TIMEOUT_S + 3
    message = str(info.value)
    assert "could not be fetched" in message
    assert "pretrained=false" in message and "TORCH_HOME" in message
    assert str(offline / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_pretrained_resnet_offline_uses_the_hub_cache(offline: Path) -> None:
    # The file torchvision would download, placed in the cache by hand (random weights stand in for ImageNet's).
    imagenet = torchvision.models.resnet18().state_dict()
    cache = offline / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet, cache / "resnet18-f37072fd.pth")
    started = time.perf_counter()
    grey = build_network("resnet18", 1, pretrained=True)
    rgb = build_network("resnet18", 3, pretrained=True)
    assert time.perf_counter() - started < 10
    body_grey, body_rgb = grey[0], rgb[0]
    assert torch.equal(body_rgb[0].weight, imagenet["conv1.weight"])
    assert torch.allclose(body_grey[0].weight, imagenet["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(body_grey[4][0].conv1.weight, imagenet["layer1.0.conv1.weight"])


def test_corrupt_cached_weights_are_reported(offline: Path) -> None:
    cache = offline / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet34-b627a593.pth").write_bytes(b"not a torch file")
    with pytest.raises(EightgenError, match="resnet34.*could not be loaded"):
        build_network("resnet34", 3, pretrained=True)


def test_pixel_classifier_applies_imagenet_normalisation() -> None:
    spec = spec_for(TrainConfig(arch="small_cnn", channels=3, normalize="imagenet"), target=8)
    model = classifier_for(spec).eval()
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    x = _pixels(4, 3)
    expected_input = torch.stack([(x[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net(expected_input), atol=1e-5)
        assert not torch.allclose(model(x), model.net(x), atol=1e-3)
    echo = PixelClassifier(torch.nn.Identity(), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(echo(x), expected_input, atol=1e-6)


def test_no_normalisation_is_the_identity() -> None:
    spec = spec_for(TrainConfig(arch="small_cnn", channels=1), target=3)
    assert spec.mean == (0.0,) and spec.std == (1.0,)
    assert spec.class_names == ("not_3", "3")
    x = _pixels(3, 1)
    assert torch.equal(PixelClassifier(torch.nn.Identity(), spec.mean, spec.std)(x), x)


def test_spec_needs_one_statistic_per_channel() -> None:
    with pytest.raises(ValueError, match="one per channel"):
        ModelSpec(arch="small_cnn", channels=3, normalize="none", mean=(0.0,), std=(1.0,), target=8)


def test_to_model_input_scales_and_repeats_grey() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    one, three = to_model_input(x, 1), to_model_input(x, 3)
    assert one.shape == (6, 1, 28, 28) and three.shape == (6, 3, 28, 28)
    assert one.dtype == three.dtype == torch.float32
    assert one[0, 0, 0, 0] == 0.0 and one[0, 0, 0, 1] == 1.0
    assert torch.allclose(one[:, 0], torch.from_numpy(x).float() / 255)
    assert all(torch.equal(three[:, c], one[:, 0]) for c in range(3))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 28, 28), np.float32), "images must be a uint8 numpy array, got float32"),
        (np.zeros((2, 28, 27), np.uint8), r"images must have shape \[N, 28, 28\], got \[2, 28, 27\]"),
        (np.zeros((28, 28), np.uint8), r"images must have shape \[N, 28, 28\], got \[28, 28\]"),
    ],
)
def test_to_model_input_rejects_other_arrays(bad: np.ndarray, message: str) -> None:
    with pytest.raises(EightgenError, match=message):
        to_model_input(bad, 1)


def _saved(directory: Path, arch: str, channels: int, normalize: str = "none") -> tuple[PixelClassifier, ModelSpec]:
    torch.manual_seed(0)
    spec = spec_for(TrainConfig(arch=arch, channels=channels, normalize=normalize), target=8)
    model = classifier_for(spec)
    # Non-trivial BatchNorm statistics, so the round trip has to carry buffers as well as weights.
    model.train()
    with torch.no_grad():
        model(_pixels(16, channels, seed=1))
    directory.mkdir(parents=True, exist_ok=True)
    save_classifier(model, spec, directory)
    return model.eval(), spec


@pytest.mark.parametrize(("arch", "channels", "normalize"), [("small_cnn", 1, "none"), ("resnet18", 3, "imagenet")])
def test_load_classifier_round_trip_gives_identical_logits(
    tmp_path: Path, arch: str, channels: int, normalize: str
) -> None:
    model, spec = _saved(tmp_path, arch, channels, normalize)
    loaded, loaded_spec = load_classifier(tmp_path, CPU)
    assert loaded_spec == spec
    assert isinstance(loaded, PixelClassifier) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _pixels(8, channels, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(loaded(x)[:, 1].sum(), x)
    assert grad.abs().sum() > 0


def test_load_classifier_rejects_a_corrupt_model_file(tmp_path: Path) -> None:
    _saved(tmp_path, "small_cnn", 1)
    (tmp_path / MODEL_FILE).write_bytes(b"\x80\x04garbage, not a zip archive")
    with pytest.raises(EightgenError, match=f"{MODEL_FILE}.*not a readable torch state_dict"):
        load_classifier(tmp_path, CPU)


def test_load_classifier_rejects_a_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    _saved(tmp_path, "small_cnn", 1)
    torch.save([torch.zeros(3)], tmp_path / MODEL_FILE)
    with pytest.raises(EightgenError, match=f"{MODEL_FILE}.*not a state_dict"):
        load_classifier(tmp_path, CPU)


def test_load_classifier_checks_the_manifest_when_there_is_one(tmp_path: Path) -> None:
    _saved(tmp_path, "small_cnn", 1)
    write_manifest(tmp_path, {"kind": "model"}, [MODEL_FILE, SPEC_FILE])
    load_classifier(tmp_path, CPU)
    with open(tmp_path / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(EightgenError, match=f"{MODEL_FILE}.*sha256"):
        load_classifier(tmp_path, CPU)


@pytest.mark.parametrize(("arch", "channels"), [("resnet18", 1), ("small_cnn", 3)])
def test_load_classifier_rejects_weights_of_another_network(tmp_path: Path, arch: str, channels: int) -> None:
    _saved(tmp_path, "small_cnn", 1)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec.update(arch=arch, channels=channels, mean=[0.0] * channels, std=[1.0] * channels)
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    expected = f"{MODEL_FILE}.*do not fit spec.json \\(arch={arch}, channels={channels}\\)"
    with pytest.raises(EightgenError, match=expected):
        load_classifier(tmp_path, CPU)


def test_load_classifier_rejects_normalisation_that_differs_from_the_spec(tmp_path: Path) -> None:
    _saved(tmp_path, "small_cnn", 3)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec.update(normalize="imagenet", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(EightgenError, match=f"{MODEL_FILE}.*mean/std buffers differ"):
        load_classifier(tmp_path, CPU)


def test_load_classifier_rejects_a_bad_spec(tmp_path: Path) -> None:
    _saved(tmp_path, "small_cnn", 1)
    (tmp_path / SPEC_FILE).write_text('{"arch": "small_cnn"')
    with pytest.raises(EightgenError, match=f"{SPEC_FILE}.*corrupt JSON"):
        load_classifier(tmp_path, CPU)
    (tmp_path / SPEC_FILE).write_text(json.dumps({"arch": "alexnet", "channels": 1}))
    with pytest.raises(EightgenError, match=f"{SPEC_FILE}.*invalid model spec \\(arch"):
        load_classifier(tmp_path, CPU)


def test_load_classifier_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="nowhere: model directory not found"):
        load_classifier(tmp_path / "nowhere", CPU)
    with pytest.raises(EightgenError, match=f"{SPEC_FILE}.*missing"):
        load_classifier(tmp_path, CPU)


def test_pick_device_follows_what_is_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu") == CPU
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
    else:
        with pytest.raises(EightgenError, match="'cuda'.*not available"):
            pick_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(EightgenError, match="'mps'.*not available"):
            pick_device("mps")


def test_pick_device_rejects_unknown_names() -> None:
    with pytest.raises(EightgenError, match="'tpu'"):
        pick_device("tpu")
