"""The robustness sweep: `--adv-eps` lists, the classic pair's names and keys kept, the sweep summary and figure, one tiny
real sweep."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from cli.aligned import build_aligned_config, sweep_lines
from cli.main import main, parser
from eightgen.config import SWEEP_MAX_TRAIN, SWEEP_RADII, AlignedConfig, AttackConfig, DatasetConfig, ExperimentConfig, TrainConfig, sweep_of
from reports.aligned import AlignedRun, aligned_summary
from reports.formatting import plain_json
from reports.sweep import sweep_figure

SWEEP = "0,0.25,0.5,1,2,3"


def _cfg(*argv: str) -> AlignedConfig:
    return build_aligned_config(parser().parse_args(["aligned", *argv]))


# --- configuration and command line ------------------------------------------------------------


def test_a_list_of_radii_is_one_detector_each_and_raises_the_referee() -> None:
    cfg = _cfg("--adv-eps", "3,0,0.25,0.5,1,2")
    assert cfg.radii == cfg.radii_in_force == (0.0, 0.25, 0.5, 1.0, 2.0, 3.0)
    assert list(cfg.detectors) == ["standard", "robust0.25", "robust0.5", "robust1", "robust", "robust3"]
    assert [t.radius for t in cfg.detectors.values()] == list(cfg.radii)
    # one robust-accuracy radius for all, so they compare
    assert {t.robust_eval for t in cfg.detectors.values()} == {("l2", 2.0)}
    assert cfg.referees.robust_eps == 4.5  # 1.5 x the largest radius, when --referee-eps is not given
    assert _cfg("--adv-eps", SWEEP, "--eval-eps", "1").detectors["robust"].robust_eval == ("l2", 1.0)
    assert cfg.experiment("robust0.25", 8.0).run_dir == cfg.root_dir / "robust0.25-eps8"


def test_the_classic_pair_keeps_its_names_and_cache_keys() -> None:
    classic = _cfg()
    assert _cfg("--adv-eps", "0,2").run_label == _cfg("--adv-eps", "2").run_label == classic.run_label
    assert "radii" not in classic.model_dump() and "eval_eps" not in classic.model_dump()
    assert list(classic.detectors) == ["standard", "robust"] and classic.referees.robust_eps == 3.0
    assert classic.detectors["standard"].robust_eval_eps == 2.0 and classic.detectors["robust"].robust_eval_eps is None
    sweep = _cfg("--adv-eps", SWEEP)
    for name in ("standard", "robust"):  # the sweep trains the classic pair's detectors: the same cache entries
        assert sweep.detectors[name] == classic.detectors[name], name
    one = _cfg("--adv-eps", "1")
    assert list(one.detectors) == ["standard", "robust"] and one.robust.adv_eps == 1.0 and one.radii is None
    assert AlignedConfig.model_validate(sweep.model_dump(mode="json")) == sweep


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adv-eps", "0,-1"], "training radii (--adv-eps) must be >= 0"),
        (["--adv-eps", "0,1,1"], "training radii (--adv-eps) repeat"),
        (["--adv-eps", ","], "no training radii (--adv-eps)"),
        (["--adv-eps", "0,nan"], "radii.1: Input should be a finite number"),
        (["--adv-eps", SWEEP, "--referee-eps", "3"], "must exceed the largest training radius (3)"),
        (["--adv-eps", "0.5,1", "--check"], "--check needs the standard and a robust detector"),
    ],
)
def test_bad_radii_fail_in_one_line_before_any_work(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = main(["aligned", *argv, "--runs-root", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_served_sweep_and_prefect_yaml_agree(monkeypatch) -> None:
    import yaml

    monkeypatch.delenv("EIGHTGEN_MNIST_DIR", raising=False)
    (dep,) = [d for d in yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())["deployments"] if d["name"] == "sweep"]
    base = AlignedConfig()
    served = sweep_of(base.model_copy(update={"dataset": base.dataset.model_copy(update={"max_train": SWEEP_MAX_TRAIN})}))
    assert AlignedConfig.model_validate(dep["parameters"]["cfg"]) == served
    assert served.radii == SWEEP_RADII and served.referees.robust_eps == 4.5
    assert served.run_label == _cfg("--adv-eps", SWEEP, "--max-train", str(SWEEP_MAX_TRAIN)).run_label  # the CLI's sweep


# --- the sweep summary and figure from stand-in judged runs --------------------------------------


def _judged(radius: float, budget: float, knn_share: float) -> AlignedRun:
    """A stand-in judged run: 20 starts of digit 1, the k-NN calling knn_share of them 8; its detector's metrics."""
    n = 20
    is_target = np.arange(n) < round(knn_share * n)
    results = pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(n)], "start_kind": ["digit"] * n, "start_digit": [1] * n, "seed": np.arange(n),
            "success": np.ones(n, bool), "flip_step": np.full(n, 3.0), "l2_final": np.full(n, budget), "l2_at_flip": np.full(n, 1.0),
            "p_target_start": np.full(n, 0.01), "knn_is_target": is_target, "knn_share_target": is_target * 0.8,
            "ref_robust_is_target": is_target, "ref_cnn_is_target": np.ones(n, bool), "ref_robust_is_start": ~is_target,
            "ref_cnn_is_start": np.zeros(n, bool), "ref_robust_pred": np.where(is_target, 8, 1), "ref_cnn_pred": np.full(n, 8),
        }
    )
    train = TrainConfig() if radius == 0 else TrainConfig(adversarial="l2", adv_eps=radius)
    config = ExperimentConfig(train=train, attack=AttackConfig(start_digits=(1,)), dataset=DatasetConfig())
    wrong = int(10 * (1 + radius))
    metrics = {
        "valid_error": wrong / 1000, "n_valid": 1000, "confusion": [[900, wrong // 2], [wrong - wrong // 2, 100 - wrong]],
        "robust": {"norm": "l2", "eps": 2.0, "steps": 20, "n": 500, "robust_accuracy": min(radius / 3, 1.0)}, "epochs": 1,
    }
    model = SimpleNamespace(metrics=metrics, sha256="0" * 64)
    run = SimpleNamespace(record=SimpleNamespace(config=config, model=model), target=8)
    name = "standard" if radius == 0 else ("robust" if radius == 2 else f"robust{radius:g}")
    return AlignedRun(Path(f"{name}-eps{budget:g}"), name, budget, run, results, np.zeros((n, 1, 28, 28)), np.zeros((n, 1, 28, 28)))


def test_sweep_summary_puts_each_referee_share_against_the_radius() -> None:
    knn = {0.0: 0.05, 1.0: 0.4, 2.0: 0.9}
    runs = [_judged(r, b, k * b / 8) for r, k in knn.items() for b in (4.0, 8.0)]
    summary = aligned_summary(runs[::-1], matched_budget=8.0)
    sweep = summary["sweep"]
    assert [d["detector"] for d in sweep["detectors"]] == ["standard", "robust1", "robust"]
    assert [d["radius"] for d in sweep["detectors"]] == [0.0, 1.0, 2.0] and sweep["budgets"] == [4.0, 8.0]
    assert sweep["eval"] == {"norm": "l2", "eps": 2.0, "steps": 20}
    standard = sweep["detectors"][0]
    assert (standard["clean_error"]["k"], standard["clean_error"]["n"]) == (10, 1000)
    assert (standard["robust_accuracy"]["k"], standard["robust_accuracy"]["n"]) == (0, 500)
    points = next(c["points"] for c in sweep["curves"] if c["referee"] == "knn" and c["budget"] == 8.0)
    assert [p["share"] for p in points] == pytest.approx(list(knn.values()))
    # every share carries an exact interval that is never zero-width, also at 0 and 1
    shares = [p for c in sweep["curves"] for p in c["points"]] + [d[k] for d in sweep["detectors"] for k in ("clean_error", "robust_accuracy")]
    assert all(s["lo"] <= s["share"] <= s["hi"] and s["hi"] > s["lo"] for s in shares)
    assert {c["referee"] for c in sweep["curves"]} == {"knn", "robust", "cnn"}
    # the answer: the least radius whose k-NN lower bound reaches one half at the matched budget (18 of 20: yes; 8 of 20: no)
    assert sweep["draws_from"]["radius"] == 2.0
    assert "training at L2 radius 2 is the least of these that draws 8s" in sweep["answer"]
    json.dumps(plain_json(summary), allow_nan=False)
    # the classic targets are still judged on the standard and the robust detector
    assert {t["detector"] for t in summary["targets"]} == {"standard", "robust"}
    fig = sweep_figure(sweep, {"knn": "k-NN", "robust": "robust referee", "cnn": "standard referee"}, "digit")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "k-NN", "robust referee", "standard referee", "clean validation error", "robust accuracy, L2 PGD ε 2"
    ]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["budget 4", "budget 8"]  # one line per budget
    lines = sweep_lines(sweep)
    assert len(lines) == 1 + 3 + 1 and lines[1].split()[:2] == ["0", "1.0%"] and lines[-1] == sweep["answer"]


def test_the_classic_pair_has_no_sweep_section() -> None:
    summary = aligned_summary([_judged(0.0, 8.0, 0.1), _judged(2.0, 8.0, 0.9)], matched_budget=8.0)
    assert "sweep" not in summary


# --- one tiny real sweep ------------------------------------------------------------------------


@pytest.mark.slow  # three detectors, the referees and six judged runs: about a minute on 2 cores
def test_a_tiny_sweep_of_three_radii_end_to_end(prefect_harness, mnist_dir: Path, tmp_path: Path) -> None:
    from flows.aligned import aligned_flow
    from prefect_api.records import wait_for_records

    cfg = _cfg(
        "--adv-eps", "0,0.5,1", "--pool-per-digit", "3", "--valid-fraction", "0.01", "--referee-fraction", "0.05", "--max-train", "500",
        "--epochs", "1", "--adv-steps", "2", "--referee-epochs", "1", "--budgets", "1,3", "--matched-budget", "3", "--seeds", "2",
        "--steps", "6", "--digits", "1,3", "--grid-seeds", "1", "--device", "cpu", "--mnist-dir", str(mnist_dir),
        "--runs-root", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
    )
    assert list(cfg.detectors) == ["standard", "robust0.5", "robust"] and cfg.referees.robust_eps == 3.0
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        state = aligned_flow(cfg, return_state=True)
        assert state.is_completed(), state
        wait_for_records(state.state_details.flow_run_id)
    html = Path(state.result()).read_text()
    for anchor in ('id="aligned-sweep"', 'id="fig-sweep"', 'id="sweep-table"', 'data-detector="robust0.5"', "<th>robust0.5</th>"):
        assert anchor in html, anchor
    summary = json.loads((cfg.root_dir / "aligned.json").read_text())
    sweep = summary["sweep"]
    assert [(d["detector"], d["radius"]) for d in sweep["detectors"]] == [("standard", 0.0), ("robust0.5", 0.5), ("robust", 1.0)]
    assert sweep["eval"]["eps"] == 2.0 and all(d["robust_accuracy"]["n"] > 0 for d in sweep["detectors"])
    assert len(summary["cells"]) == 3 * 2 and len(summary["targets"]) == 5
    for c in summary["cells"]:
        digits = c["digits"]
        res = pd.read_parquet(cfg.experiment(c["detector"], c["budget"]).run_dir / "results.parquet")
        starts = res[res["start_kind"] == "digit"]
        assert digits["referees"]["knn"]["k"] == int(starts["knn_is_target"].sum()), c
