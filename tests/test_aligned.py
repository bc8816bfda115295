"""The aligned experiment as real Prefect flow runs on real MNIST: judged runs, the report section, reuse, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from pydantic import ValidationError

from eightgen.config import AlignedConfig, AttackConfig, DatasetConfig, RefereeConfig, TrainConfig
from eightgen.rundir import load_record, trajectories
from flows.aligned import aligned_flow
from cli.aligned import build_aligned_config, summary_lines
from cli.main import main, parser
from prefect_api.records import task_run_states, wait_for_records
from reports.aligned import REFEREE_COLUMNS

pytestmark = pytest.mark.slow  # trains models, starts servers or clusters: the full suite only

BUDGETS = (1.0, 3.0)
# The CLI options that build the same tiny config as the fixture (so a CLI run finds everything cached).
TINY_OPTIONS = [
    "--pool-per-digit", "3", "--valid-fraction", "0.01", "--referee-fraction", "0.05", "--max-train", "500", "--epochs", "1", "--adv-eps", "1",
    "--adv-steps", "2", "--referee-epochs", "1", "--referee-eps", "2", "--budgets", "1,3", "--matched-budget", "3",
    "--seeds", "2", "--steps", "6", "--digits", "1,3", "--grid-seeds", "1", "--device", "cpu",
]


def tiny(mnist_dir: Path, root: Path) -> AlignedConfig:
    """What `eightgen aligned TINY_OPTIONS` builds (a 1% validation split keeps the robust-accuracy checks cheap)."""
    args = parser().parse_args(["aligned", *TINY_OPTIONS, "--mnist-dir", str(mnist_dir), "--runs-root", str(root / "runs"), "--cache-dir", str(root / "cache")])
    return build_aligned_config(args)


def _run(cfg: AlignedConfig):
    state = aligned_flow(cfg, return_state=True)
    assert state.is_completed(), state
    wait_for_records(state.state_details.flow_run_id)
    return Path(state.result()), task_run_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def cfg(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AlignedConfig:
    return tiny(mnist_dir, tmp_path_factory.mktemp("aligned"))


def _latest_aligned_states() -> dict[str, list[str]]:
    """Task states of the most recent flow run of the aligned flow."""
    with get_client(sync_client=True) as client:
        flow = client.read_flow_by_name("aligned")
        latest = client.read_flow_runs(
            flow_filter=FlowFilter(id=FlowFilterId(any_=[flow.id])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )[0]
    return task_run_states(latest.id)


@pytest.fixture(scope="module")
def runs(prefect_harness, cfg: AlignedConfig):
    """The first run of the tiny aligned flow."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: cfg.cache_dir / "prefect-results"}):
        yield _run(cfg)


def test_report_section_and_summary(runs, cfg: AlignedConfig) -> None:
    report, _ = runs
    assert report == cfg.root_dir / "aligned.html"
    html = report.read_text()
    for anchor in ("aligned-answer", "targets-table", "budget-table", "fig-aligned", "aligned-grid", "grid-noise", "grid-1", "grid-3", "aligned-noise", "detector-facts", "referee-facts", "aligned-indicators"):
        assert f'id="{anchor}"' in html, anchor
    assert "http://" not in html and "https://" not in html
    assert "<title>eightgen: does it become an 8?</title>" in html and "<h2>Does it become an 8?</h2>" in html  # the target's name
    assert "<th>k-NN: 8</th>" in html and "standard vs adversarially trained 8-detector" in html
    summary = json.loads((cfg.root_dir / "aligned.json").read_text())
    assert [(c["detector"], c["budget"]) for c in summary["cells"]] == [(d, b) for b in BUDGETS for d in ("standard", "robust")]
    assert [t["key"] for t in summary["targets"]] == ["knn_robust", "knn_standard", "flip_robust", "flip_standard", "agree_robust"]
    assert summary["targets_met"] == all(t["met"] for t in summary["targets"])
    # The summary agrees with the judged results it was computed from.
    rob = pd.read_parquet(cfg.experiment("robust", 3.0).run_dir / "results.parquet")
    digits = rob[rob["start_kind"] == "digit"]
    knn = next(t for t in summary["targets"] if t["key"] == "knn_robust")
    assert knn["value"] == pytest.approx(digits["knn_is_target"].mean())
    agree = next(t for t in summary["targets"] if t["key"] == "agree_robust")
    assert agree["value"] == pytest.approx((digits["ref_robust_is_target"] == digits["knn_is_target"]).mean())
    assert set(summary["noise_referees"]) == {"knn", "robust", "cnn"}
    # Every target's interval is the exact one of its k of n, and it is judged on the bound, not the estimate.
    for t in summary["targets"]:
        ci = binomtest(t["k"], t["n"]).proportion_ci(method="exact")
        assert (t["lo"], t["hi"]) == pytest.approx((ci.low, ci.high)) and t["hi"] > t["lo"]
        assert t["met"] == ((t["lo"] >= t["threshold"]) if t["op"] == ">=" else (t["hi"] <= t["threshold"]))
    lines = summary_lines(summary)
    assert len(lines) == 1 + 4 + 2 + 5 and lines[-5:] == [l for l in lines if "needs" in l]
    for target, line in zip(summary["targets"], lines[-5:]):
        bound = f"lower bound ≥ {100 * target['threshold']:.0f}%" if target["op"] == ">=" else f"upper bound ≤ {100 * target['threshold']:.0f}%"
        assert line.startswith("  met " if target["met"] else "  MISSED") and f"{target['k']} of {target['n']} (needs {bound}, margin" in line, line


def test_runs_share_starts_and_budgets_and_carry_referee_columns(runs, cfg: AlignedConfig) -> None:
    starts = {}
    for b in BUDGETS:
        for d in ("standard", "robust"):
            run_dir = cfg.experiment(d, b).run_dir
            res = pd.read_parquet(run_dir / "results.parquet")
            assert set(REFEREE_COLUMNS) <= set(res.columns)
            assert {c + "_start" for c in ("knn_is_target", "ref_robust_is_target", "ref_cnn_is_target")} <= set(res.columns)
            assert res["collapse_final"].notna().all()
            assert (res["l2_final"] <= b + 1e-4).all()
            traj, run_ids = trajectories(run_dir).load()
            starts[(d, b)] = (list(run_ids), traj.snapshots[:, 0])
            record = load_record(run_dir)
            assert record.aligned.detector == d and record.aligned.budget == b
            assert record.referees.sha256 == json.loads((run_dir / "manifest.json").read_text())["referees"]
    ids, x0 = starts[("standard", 1.0)]
    assert len(ids) == (2 + 1) * 2
    for key, (other_ids, other_x0) in starts.items():
        assert other_ids == ids and np.array_equal(other_x0, x0), key


def test_cli_rerun_reuses_everything_and_checks_the_targets(runs, cfg: AlignedConfig, mnist_dir: Path, monkeypatch, capsys) -> None:
    _, first = runs
    assert first["train-classifier"].count("Completed") == 2 and "Completed" in first["train-referees"]
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(cfg.cache_dir / "prefect-results"))
    argv = ["aligned", *TINY_OPTIONS, "--mnist-dir", str(mnist_dir), "--runs-root", str(cfg.runs_root), "--cache-dir", str(cfg.cache_dir)]
    code = main([*argv, "--check"])
    out = capsys.readouterr().out
    second = _latest_aligned_states()
    for name in ("assemble-dataset", "train-classifier", "train-referees", "optimize-chunk", "collect-judged-results", "render-aligned"):
        assert second[name] and set(second[name]) == {"Cached"}, (name, second[name])
    summary = json.loads((cfg.root_dir / "aligned.json").read_text())
    assert code == (0 if summary["targets_met"] else 1)
    assert "targets at budget 3:" in out and out.count("needs") == 5 and f"report: {(cfg.root_dir / 'aligned.html').resolve()}" in out


def test_a_corrupt_referee_model_is_retrained_and_nothing_else(runs, cfg: AlignedConfig, mnist_dir: Path, monkeypatch, capsys) -> None:
    before = (cfg.root_dir / "aligned.json").read_bytes()
    (entry,) = [p for p in (cfg.cache_dir / "referees").iterdir() if not p.name.startswith(".")]
    damaged = max((p for p in entry.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(cfg.cache_dir / "prefect-results"))
    argv = ["aligned", *TINY_OPTIONS, "--mnist-dir", str(mnist_dir), "--runs-root", str(cfg.runs_root), "--cache-dir", str(cfg.cache_dir)]
    assert main(argv) in (0, 1)
    states = _latest_aligned_states()
    assert states["train-referees"] == ["Completed"], states
    for name in ("assemble-dataset", "train-classifier", "optimize-chunk"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    # retrained from the same data and seed: the same referees, so the same verdicts
    assert json.loads((cfg.root_dir / "aligned.json").read_bytes()) == json.loads(before)


def test_bad_aligned_settings_are_refused(mnist_dir: Path, capsys) -> None:
    with pytest.raises(ValidationError, match="matched_budget"):
        AlignedConfig(budgets=(1.0, 2.0), matched_budget=6.0)
    with pytest.raises(ValidationError, match="referee_fraction"):
        AlignedConfig(dataset=DatasetConfig())
    with pytest.raises(ValidationError, match="must exceed"):
        AlignedConfig(referees=RefereeConfig(robust_eps=1.0), robust=TrainConfig(adversarial="l2", adv_eps=2.0))
    with pytest.raises(ValidationError, match="budgeted method"):
        AlignedConfig(attack=AttackConfig(method="gd"))
    assert main(["aligned", "--mnist-dir", str(mnist_dir), "--budgets", "1,2", "--matched-budget", "5"]) == 2
    assert "matched_budget" in capsys.readouterr().err
