"""Any target class: `--target D` reaches every config section, and a whole run toward 3 reports 3, never 8."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from cli.aligned import build_aligned_config, summary_lines
from cli.main import build_config, main, parser
from eightgen.classes import FASHION_MNIST, MNIST
from eightgen.config import AttackConfig, DatasetConfig, ExperimentConfig, all_but
from eightgen.rundir import load_record
from helpers import run_pipeline, shared_cache, tiny_config
from reports.aligned import AlignedRun, aligned_summary, budget_figure


def _cfg(*argv: str) -> ExperimentConfig:
    return build_config(parser().parse_args(["run", *argv]))


# --- configuration and command line ------------------------------------------------------------


def test_target_option_sets_the_one_target_and_the_default_starts() -> None:
    cfg = _cfg("--target", "3")
    assert cfg.dataset.target == 3 and "target" not in cfg.attack.model_dump()
    assert cfg.attack.start_digits == (0, 1, 2, 4, 5, 6, 7, 8, 9)
    assert _cfg("--target", "3", "--digits", "all").attack.start_digits == (0, 1, 2, 4, 5, 6, 7, 8, 9)
    assert _cfg("--target", "3", "--digits", "1,8", "--max-train", "600").attack.start_digits == (1, 8)
    assert _cfg("--digits", "all").attack.start_digits == (0, 1, 2, 3, 4, 5, 6, 7, 9)


def test_default_starts_follow_the_target_in_python_too() -> None:
    def of(target: int, **attack: object) -> ExperimentConfig:
        return ExperimentConfig(dataset=DatasetConfig(target=target), attack=AttackConfig(**attack))

    assert AttackConfig().start_digits is None  # every class but a target only the dataset knows
    assert ExperimentConfig().attack.start_digits == (0, 1, 2, 3, 4, 5, 6, 7, 9)
    assert of(0).attack.start_digits == all_but(0) == tuple(range(1, 10))
    assert of(3, start_digits=None).attack.start_digits == all_but(3)
    assert of(3, start_digits=(2,)).attack.start_digits == (2,)
    assert ExperimentConfig(dataset={"target": 4}, attack={"seeds": 2}).attack.start_digits == all_but(4)
    # a validated config holds the tuple, so its dump round-trips to the same settings
    dumped = of(5).model_dump()
    assert dumped["attack"]["start_digits"] == all_but(5) and ExperimentConfig.model_validate(dumped) == of(5)


def test_run_label_follows_the_target_and_is_deterministic() -> None:
    eight, three = _cfg(), _cfg("--target", "3")
    assert three.run_label != eight.run_label
    assert _cfg("--target", "3").run_label == three.run_label
    assert _cfg("--target", "3", "--digits", "0,1,2,4,5,6,7,8,9").run_label == three.run_label
    assert _cfg("--target", "8").run_label == eight.run_label


@pytest.mark.parametrize("value", ["10", "-1"])
def test_bad_target_fails_in_one_line(value: str, tmp_path: Path, capsys) -> None:
    code = main(["run", "--target", value, "--runs-root", str(tmp_path / "runs")])
    out = capsys.readouterr()
    lines = (out.err + out.out).strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("eightgen: error: invalid settings:"), lines
    assert "dataset.target" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_record_with_the_old_second_target_loads_when_the_two_agree() -> None:
    old = ExperimentConfig(dataset=DatasetConfig(target=3)).model_dump(mode="json")
    old["attack"]["target"] = 3
    assert ExperimentConfig.model_validate(old) == ExperimentConfig(dataset=DatasetConfig(target=3))
    old["attack"]["target"] = 8
    with pytest.raises(ValidationError, match=r"attack.target differs from dataset.target \(3\)"):
        ExperimentConfig.model_validate(old)
    with pytest.raises(ValidationError, match="target"):  # a target of its own is not a setting of the attack
        AttackConfig(target=3)
    with pytest.raises(SystemExit):  # not an integer: argparse refuses it
        parser().parse_args(["run", "--target", "nine"])


def test_aligned_takes_a_target() -> None:
    cfg = build_aligned_config(parser().parse_args(["aligned", "--target", "3"]))
    assert cfg.dataset.target == 3
    assert cfg.attack.start_digits == all_but(3)
    runs = [cfg.experiment(d, b) for d in cfg.detectors for b in cfg.budgets]
    assert all(r.dataset.target == 3 and r.attack.start_digits == all_but(3) for r in runs)
    assert build_aligned_config(parser().parse_args(["aligned"])).run_label != cfg.run_label


def test_class_phrases() -> None:
    assert [MNIST.with_article(k) for k in (8, 3, 1)] == ["an 8", "a 3", "a 1"]
    assert [FASHION_MNIST.with_article(k) for k in (8, 9, 0)] == ["a Bag", "an Ankle boot", "a T-shirt/top"]
    assert MNIST.label(3) == "digit 3" and FASHION_MNIST.label(3) == "Dress"
    assert MNIST.plural(8) == "8s" and FASHION_MNIST.plural(8) == "Bags" and FASHION_MNIST.plural(1) == "Trousers"
    assert DatasetConfig().hub == "ylecun/mnist" and DatasetConfig(name="fashion_mnist").hub == "zalando-datasets/fashion_mnist"


# --- a whole run toward 3 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three(prefect_harness, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """A tiny real pipeline run toward target 3 (starts: noise, 1s and 8s) on the MNIST test set."""
    cache = shared_cache(tmp_path_factory)
    cfg = tiny_config(mnist_dir, cache, tmp_path_factory.mktemp("target3") / "runs", "--target", "3", "--digits", "1,8", "--max-train", "600")
    run_pipeline(cfg, cache)
    return cfg


def test_results_and_record_of_a_target_3_run(three: ExperimentConfig) -> None:
    results = pd.read_parquet(three.run_dir / "results.parquet")
    assert set(results["target"]) == {3}
    assert set(results["start_digit"].dropna().astype(int)) == {1, 8}
    record = load_record(three.run_dir)
    assert record.config.dataset.target == 3
    assert record.model.spec["target"] == 3 and list(record.model.spec["class_names"]) == ["not_3", "3"]


def test_report_of_a_target_3_run_names_3_not_8(three: ExperimentConfig) -> None:
    html = (three.run_dir / "report.html").read_text(encoding="utf-8")
    title = "eightgen report: MNIST, digit 3 vs the rest"
    assert f"<title>{title}</title>" in html and f"<h1>{title}</h1>" in html
    assert "<strong>Did the pixels become a 3?</strong>" in html
    assert "target digit <b>3</b>" in html and "end classified as 3;" in html and "Success: classified as 3 after" in html
    assert re.search(r'<tr class="target"><td>3 \(target\)</td>', html)
    assert '<h3 id="plot-p-target">p(3) along the run</h3>' in html
    assert "Median p(3) at the last step" in html  # the p-bands figure's alt text
    assert "true not 3 predicted not 3" in html  # the confusion matrix's alt text
    assert "Validation error per true digit (for the target 3:" in html
    assert "Share of starts classified as 3 at the last step" in html
    assert '<h3 id="strips-8">start digit 8</h3>' in html  # 8 is a start here, shown as one
    for eight_as_target in ("p(8)", "an 8", "classified as 8", "8 (target)", "target digit <b>8", "target 8"):
        assert eight_as_target not in html, eight_as_target


# --- the aligned report's words follow the target ----------------------------------------------


def _judged(detector: str, knn_share: float, target: int, dataset: str = "mnist") -> AlignedRun:
    """A stand-in judged run at budget 8: 20 starts of digits 1 and 8, the k-NN calling knn_share of them the target."""
    n = 20
    is_target = np.arange(n) < round(knn_share * n)
    results = pd.DataFrame(
        {
            "run_id": [f"{detector}-{i}" for i in range(n)],
            "start_kind": ["digit"] * n,
            "start_digit": [1, 8] * (n // 2),
            "seed": np.arange(n) // 2,
            "success": np.ones(n, bool),
            "flip_step": np.full(n, 3.0),
            "l2_final": np.full(n, 4.0),
            "l2_at_flip": np.full(n, 2.0),
            "p_target_start": np.full(n, 0.01),
            "knn_is_target": is_target,
            "knn_share_target": is_target * 0.8,
            "ref_robust_is_target": is_target,
            "ref_cnn_is_target": np.zeros(n, bool),
            "ref_robust_is_start": ~is_target,
            "ref_cnn_is_start": np.ones(n, bool),
            "ref_robust_pred": np.where(is_target, target, 1),
            "ref_cnn_pred": np.ones(n, int),
        }
    )
    config = ExperimentConfig(dataset=DatasetConfig(name=dataset, target=target), attack=AttackConfig(start_digits=(1, 8)))
    run = SimpleNamespace(record=SimpleNamespace(config=config), target=target)
    return AlignedRun(Path(f"{detector}-eps8"), detector, 8.0, run, results, np.zeros((n, 1, 28, 28)), np.zeros((n, 1, 28, 28)))


def test_aligned_summary_answer_and_figure_name_the_target() -> None:
    summary = aligned_summary([_judged("standard", 0.1, 3), _judged("robust", 0.9, 3)], matched_budget=8.0)
    assert summary["target"] == 3 and summary["target_name"] == "3" and summary["dataset"] == "mnist"
    assert [t["what"] for t in summary["targets"][:2]] == [
        "k-NN calls the robust detector's results 3", "k-NN calls the standard detector's results 3"
    ]
    assert "nearer to real 3s than to real images of their start digit" in summary["answer"]
    assert "its gradient draws a 3;" in summary["answer"] and "8" not in re.sub(r"\([^)]*\)|[0-9.]+%", "", summary["answer"]).replace("budget of 8", "")
    titles = [ax.get_title() for ax in budget_figure(summary).axes]
    assert titles[:4] == ["detector says 3 (flip)", "k-NN: nearer to real 3s", "robust referee says 3", "standard referee says 3"]
    assert summary_lines(summary)[0].split()[5:9] == ["kNN", "3", "robust", "3"]


def test_aligned_words_name_a_fashion_target() -> None:
    summary = aligned_summary([_judged("standard", 0.1, 8, "fashion_mnist"), _judged("robust", 0.9, 8, "fashion_mnist")], 8.0)
    assert summary["target_name"] == "Bag" and "real Bags than to real images of their start class" in summary["answer"]
    assert "its gradient draws a Bag;" in summary["answer"]
    assert [ax.get_title() for ax in budget_figure(summary).axes][4] == "robust referee: still start class"
