"""Fashion-MNIST: a small dataset in each of its formats (IDX files, Hub-style parquet, save_to_disk), read with its
class indices, and whole pipeline runs toward "Bag" whose reports name classes, never digits."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from helpers import TINY, run_pipeline, shared_cache
from PIL import Image
from pydantic import ValidationError

from cli.main import build_config, parser
from eightgen.classes import FASHION_MNIST
from eightgen.config import DatasetConfig, ExperimentConfig
from eightgen.data.sources import load_mnist
from eightgen.errors import EightgenError
from eightgen.rundir import load_record

# The label feature of zalando-datasets/fashion_mnist on the Hub (its names are not the report's).
HUB_NAMES = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_NAMES)})
N_TEST, N_ALL = 1000, 2500  # Hub-style sets: test split images 0:1000, train split 1000:2500
RELABEL = np.array([5, 8, 2, 9, 0, 7, 1, 4, 6, 3], dtype=np.uint8)  # digit -> class index: no class is its digit


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _split(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """A split stored the way the Hub stores Fashion-MNIST: PNG bytes and a ClassLabel of its ten names."""
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels.tolist()}, features=FEATURES)


@pytest.fixture(scope="module")
def fashion(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real MNIST test images under Fashion-MNIST class indices, as gzipped IDX files, parquet files and save_to_disk."""
    real = load_mnist(DatasetConfig(source="idx", mnist_dir=mnist_dir))
    images, labels = real.images[:N_ALL], RELABEL[real.labels[:N_ALL]]
    root = tmp_path_factory.mktemp("fashion")
    (root / "idx").mkdir()
    (root / "idx" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images), compresslevel=1))
    (root / "idx" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels), compresslevel=1))
    test, train = _split(images[:N_TEST], labels[:N_TEST]), _split(images[N_TEST:], labels[N_TEST:])
    (root / "parquet").mkdir()
    train.to_parquet(root / "parquet" / "train-00000-of-00001.parquet")
    test.to_parquet(root / "parquet" / "test-00000-of-00001.parquet")
    datasets.DatasetDict(train=train, test=test).save_to_disk(root / "disk")
    options = {"idx": ["--data-dir", str(root / "idx")], "parquet": ["--local-path", str(root / "parquet")], "disk": ["--local-path", str(root / "disk")]}
    return {"images": images, "labels": labels, "options": options, "root": root}


def _cfg(*argv: str) -> ExperimentConfig:
    return build_config(parser().parse_args(["run", *argv]))


# --- configuration and sources -----------------------------------------------------------------


def test_dataset_option_names_the_set_and_its_hub_name(tmp_path: Path) -> None:
    cfg = _cfg("--dataset", "fashion_mnist", "--target", "8", "--data-dir", str(tmp_path))
    assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.hub == "zalando-datasets/fashion_mnist"
    assert cfg.dataset.mnist_dir == tmp_path and cfg.dataset.classes.name_of(cfg.dataset.target) == "Bag"
    assert _cfg().dataset.hub == "ylecun/mnist" and _cfg().run_label != _cfg("--dataset", "fashion_mnist").run_label
    with pytest.raises(ValidationError, match="hub_name 'ylecun/mnist' is the MNIST dataset, but name is 'fashion_mnist'"):
        DatasetConfig(name="fashion_mnist", hub_name="ylecun/mnist")
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--dataset", "kmnist"])


@pytest.mark.parametrize("kind", ["idx", "parquet", "disk"])
def test_each_format_gives_the_class_indices(fashion: dict, kind: str) -> None:
    path = Path(fashion["options"][kind][1])
    cfg = DatasetConfig(name="fashion_mnist", **({"mnist_dir": path} if kind == "idx" else {"local_path": path}))
    data = load_mnist(cfg)
    if kind == "idx":
        assert data.description.startswith("Fashion-MNIST IDX files in")
        assert np.array_equal(data.images, fashion["images"]) and np.array_equal(data.labels, fashion["labels"])
    else:  # the train split first, as eightgen orders splits
        images, labels = fashion["images"], fashion["labels"]
        assert data.split.tolist() == ["train"] * (N_ALL - N_TEST) + ["test"] * N_TEST
        assert np.array_equal(data.labels, np.r_[labels[N_TEST:], labels[:N_TEST]])
        assert np.array_equal(data.images, np.concatenate([images[N_TEST:], images[:N_TEST]]))


def test_a_class_label_of_other_than_ten_names_is_refused(tmp_path: Path) -> None:
    three = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["Bag", "Coat", "Dress"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (28, 28))] * 2, "label": [0, 2]}, features=three)
    ds.to_parquet(tmp_path / "test.parquet")
    with pytest.raises(EightgenError, match=r"the label has 3 classes \(Bag, Coat, Dress\), expected 10"):
        load_mnist(DatasetConfig(name="fashion_mnist", local_path=tmp_path / "test.parquet"))


def test_idx_errors_name_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="no Fashion-MNIST IDX files"):
        load_mnist(DatasetConfig(name="fashion_mnist", mnist_dir=tmp_path))


# --- whole runs toward Bag ----------------------------------------------------------------------


def _run(fashion: dict, kind: str, prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    cache = shared_cache(tmp_path_factory)
    argv = ["run", *TINY, "--max-train", "600", "--dataset", "fashion_mnist", "--target", "8", *fashion["options"][kind]]
    argv += ["--cache-dir", str(cache), "--runs-root", str(tmp_path_factory.mktemp(f"fashion-{kind}") / "runs")]
    cfg = build_config(parser().parse_args(argv))
    run_pipeline(cfg, cache)
    return cfg


def _check_run(cfg: ExperimentConfig) -> None:
    results = pd.read_parquet(cfg.run_dir / "results.parquet")
    assert set(results["target"]) == {8} and set(results["start_digit"].dropna().astype(int)) == {1, 3}
    record = load_record(cfg.run_dir)
    assert record.config.dataset.name == "fashion_mnist"
    html = (cfg.run_dir / "report.html").read_text(encoding="utf-8")
    assert "<title>eightgen report: Fashion-MNIST, Bag vs the rest</title>" in html
    assert "<strong>Did the pixels become a Bag?</strong>" in html and "Fashion-MNIST, target class <b>Bag</b>" in html
    assert "end classified as Bag;" in html and '<h3 id="plot-p-target">p(Bag) along the run</h3>' in html
    # the dataset table names every class; the outcome table, strips and figures name the start classes
    for name in FASHION_MNIST.names:
        shown = f"{name} (target)" if name == "Bag" else name
        assert re.search(rf'<tr( class="target")?><td>{re.escape(shown)}</td>', html), name
    assert re.search(r'<tr data-group="1">\s*<td>Trouser</td>', html) and re.search(r'<tr data-group="3">\s*<td>Dress</td>', html)
    assert '<h3 id="strips-1">start Trouser</h3>' in html and '<h3 id="strips-3">start Dress</h3>' in html
    assert "true not Bag predicted not Bag" in html and "Validation error per true class (for the target Bag:" in html
    assert "Trouser: " in html and "Dress: " in html  # figure alt texts list the start classes
    # no class index shown as a class name, in the text or the images' alt texts (config.json's own field names aside)
    assert not re.search(r"<tr( class=\"target\")?><td>\d", html)
    shown = re.sub(r"<(script|style|pre)\b.*?</\1>", "", html, flags=re.S)
    shown = re.sub(r'<img\b[^>]*\balt="([^"]*)"[^>]*>', r" \1 ", shown)
    shown = re.sub(r"<[^>]*>", " ", shown)
    assert "Median p(Bag) at the last step" in shown  # alt texts are part of what is checked
    for digit_as_class in ("digit", "p(8)", "p(1)", "an 8", "classified as 8", "8 (target)"):
        assert digit_as_class not in shown, digit_as_class


def test_a_whole_run_on_fashion_idx_files_reports_class_names(fashion: dict, prefect_harness, tmp_path_factory) -> None:
    _check_run(_run(fashion, "idx", prefect_harness, tmp_path_factory))


@pytest.mark.slow  # two more trained detectors and runs: about 20 s
@pytest.mark.parametrize("kind", ["parquet", "disk"])
def test_a_whole_run_on_hub_style_fashion_data_reports_class_names(fashion: dict, kind: str, prefect_harness, tmp_path_factory) -> None:
    _check_run(_run(fashion, kind, prefect_harness, tmp_path_factory))


@pytest.mark.slow
def test_the_diffusion_command_toward_a_dress_names_the_class(fashion: dict, prefect_harness, tmp_path: Path, capsys) -> None:
    """`eightgen diffusion --dataset fashion_mnist --target 3`: the shared data options reach every stage of the
    three-ways experiment, and its report and summary name the class."""
    import json

    from test_diffusion import TINY_OPTIONS

    from cli.main import main

    options = list(TINY_OPTIONS)
    options[options.index("--digits") + 1] = "1,2"
    options[options.index("--valid-fraction") + 1] = "0.1"  # of 2,500 images: enough real Dresses for two Fréchet samples
    argv = ["diffusion", *options, "--dataset", "fashion_mnist", "--target", "3", *fashion["options"]["idx"]]
    assert main([*argv, "--runs-root", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    report = Path(out.strip().splitlines()[-1].removeprefix("report: "))
    summary = json.loads((report.parent / "diffusion.json").read_text())
    assert (summary["target"], summary["target_name"]) == (3, "Dress")
    page = report.read_text()
    assert "<title>eightgen: three ways to a Dress</title>" in page and "real Dress images" in page
    text = re.sub(r"<[^>]+>", " ", page)  # what a reader sees (data attributes keep the start kind's key, "digit")
    assert not re.search(r"\b(an? 8|digits?)\b", text), re.search(r".{0,60}\b(an? 8|digits?)\b.{0,60}", text)
    record = load_record(next(p for p in (tmp_path / "runs").glob("*/robust-*") if p.is_dir()))
    assert (record.config.dataset.name, record.target, record.config.attack.start_digits) == ("fashion_mnist", 3, (1, 2))
