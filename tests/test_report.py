"""The HTML report: rendered from a synthetic run directory, its numbers recomputed independently from results.parquet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_report import make_run_dir, rewrite_results
from scipy.stats import binomtest

from eightgen.errors import EightgenError
from eightgen.rundir import trajectories
from reports import stats
from reports.render import render_report
from reports.runs import load_run, read_snapshots
from reports.summary import digit_table, summary_markdown

RUN_SECTIONS = {"headline", "answer", "dataset", "dataset-counts", "classifier", "outcomes", "outcome-table", "plots",
                "fig-success", "fig-p-target", "fig-survival", "fig-l2", "fig-flip-scatter", "fig-confusion",
                "fig-digit-error", "strips", "animation", "galleries", "gallery-most", "gallery-least", "config"}


class Page(HTMLParser):
    """The parts of a report the tests look at: ids, images, resource references, and outcome-table cells."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[dict] = []
        self.refs: list[str] = []
        self.cells: dict[tuple[str, str], dict] = {}
        self.strips: list[str] = []
        self._group: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr":
            self._group = a.get("data-group")
        if tag == "td" and self._group is not None and "data-col" in a:
            self.cells[(self._group, a["data-col"])] = a
        if tag == "div" and "data-run-id" in a:
            self.strips.append(a["data-run-id"])


def value(cell: dict, key: str = "data-value") -> float:
    return float(cell[key])


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def run_dir(runs_root: Path) -> Path:
    return make_run_dir(runs_root, "base", seeds=6)


@pytest.fixture(scope="module")
def page(run_dir: Path) -> Page:
    out = render_report([run_dir])
    assert out == run_dir / "report.html"
    return Page(out.read_text(encoding="utf-8"))


def expected_rows(results: pd.DataFrame) -> dict[str, dict]:
    """Per group (and "all") the table's numbers, recomputed with plain pandas."""
    results = results.copy()
    results["g"] = np.where(results["start_kind"] == "noise", "noise", results["start_digit"].astype("string"))
    out = {}
    for name, sub in [*results.groupby("g"), ("all", results)]:
        flip = sub["flip_step"].dropna().astype(float)
        l2f = sub["l2_at_flip"].dropna().astype(float)
        out[name] = {
            "n": len(sub),
            "success_rate": sub["success"].mean(),
            "flip_median": flip.median() if len(flip) else np.nan,
            "censored_share": sub["flip_step"].isna().mean(),
            "l2_flip_median": (l2f.median(), l2f.quantile(0.25), l2f.quantile(0.75)) if len(l2f) else (np.nan,) * 3,
            "l2_final_median": (sub["l2_final"].median(), sub["l2_final"].quantile(0.25), sub["l2_final"].quantile(0.75)),
            "linf_final_median": sub["linf_final"].median(),
            "p_start_median": sub["p_target_start"].astype(float).median(),
            "grad_zero_share": (sub["grad_norm_final"] == 0).mean(),
            "saturated_share": ((sub["p_target_start"] < 1e-6) | (sub["p_target_start"] > 1 - 1e-6)).mean(),
            "outside_share": (sub["frac_outside_01"] > 0).mean(),
        }
    return out


def test_sections_present(page: Page) -> None:
    assert RUN_SECTIONS <= page.ids


def test_table_equals_recomputed_numbers(page: Page, run_dir: Path) -> None:
    results = pd.read_parquet(run_dir / "results.parquet")
    expected = expected_rows(results)
    groups = {g for g, _ in page.cells}
    assert groups == set(expected)
    for g, want in expected.items():
        for col, v in want.items():
            cell = page.cells[(g, col)]
            if isinstance(v, tuple):
                got = (value(cell), value(cell, "data-q25"), value(cell, "data-q75"))
                assert np.allclose(got, v, rtol=1e-6, equal_nan=True), (g, col)
            else:
                assert np.isclose(value(cell), v, rtol=1e-6, equal_nan=True), (g, col, value(cell), v)
        # Every share's interval is the exact one, recomputed with scipy from the stored rows.
        n = want["n"]
        cells = [("success_ci", want["success_rate"])] + [(c, v) for c, v in want.items() if c.endswith("_share")]
        for col, share in cells:
            cell = page.cells[(g, col)]
            ci = binomtest(round(share * n), n).proportion_ci(method="exact")
            assert np.isclose(float(cell["data-lo"]), ci.low, atol=1e-9) and np.isclose(float(cell["data-hi"]), ci.high, atol=1e-9), (g, col)
    assert page.cells[("all", "n")]["data-value"] == repr(float(len(results)))


def test_digit_table_is_json_safe_and_matches(run_dir: Path) -> None:
    rows = digit_table(load_run(run_dir))
    json.dumps(rows, allow_nan=False)
    expected = expected_rows(pd.read_parquet(run_dir / "results.parquet"))
    assert [r["group"] for r in rows] == ["noise", "0", "1", "2", "3", "4", "5", "6", "7", "9", "all"]
    for r in rows:
        assert r["n"] == expected[r["group"]]["n"]
        assert np.isclose(r["success_rate"], expected[r["group"]]["success_rate"])


def test_summary_markdown_has_key_numbers(run_dir: Path) -> None:
    results = pd.read_parquet(run_dir / "results.parquet")
    md = summary_markdown(load_run(run_dir))
    assert f"{int(results['success'].sum()):,} / {len(results):,}" in md
    assert f"{100 * results['success'].mean():.1f}%" in md
    assert "- **method** seed (loss " in md and "- **model** small\\_cnn, validation error " in md


def test_summary_does_not_import_matplotlib() -> None:
    """A cached pipeline run publishes the summary and must not pay for loading matplotlib."""
    code = "import reports.summary, sys; assert 'matplotlib' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_images_embedded_with_alt_text(page: Page) -> None:
    assert len(page.imgs) > 50
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert img.get("alt"), img["src"][:40]


def test_no_network_references(page: Page, run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    assert not [r for r in page.refs if re.match(r"\s*(https?:)?//", r)]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", html, re.I)
    assert "url(http" not in html and "@import" not in html


def test_strips_cover_every_group(page: Page, run_dir: Path) -> None:
    run = load_run(run_dir)
    per_group = pd.Series([s.split("-")[0] for s in page.strips]).value_counts()
    assert set(per_group.index) == {"noise", *(f"d{d}" for d in (0, 1, 2, 3, 4, 5, 6, 7, 9))}
    assert (per_group == run.report.strips_per_digit).all()


def test_script_in_run_name_is_escaped(runs_root: Path) -> None:
    evil = "<script>alert(1)</script>"
    run_dir = make_run_dir(runs_root, "evil", run_name=evil, seeds=2, digits=(3,))
    out = render_report([run_dir], runs_root / "elsewhere" / "evil.html")
    assert out == runs_root / "elsewhere" / "evil.html" and not (run_dir / "report.html").exists()
    html = out.read_text()
    assert evil not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 2
    assert "<script>" not in summary_markdown(load_run(run_dir))


def test_comparison_of_two_runs(runs_root: Path, run_dir: Path) -> None:
    other = make_run_dir(runs_root, "gd-run", seeds=4, method="gd", rng_seed=1)
    out = render_report([run_dir, other])
    assert out == runs_root / "compare.html"
    html = out.read_text()
    p = Page(html)
    assert {"compare-table", "fig-compare-success", "fig-compare-p", "fig-compare-survival", "fig-compare-l2"} <= p.ids
    assert {g for g, _ in p.cells} == {"base", "gd-run"}  # one table row per run, named by the run
    rates = [pd.read_parquet(d / "results.parquet")["success"].mean() for d in (run_dir, other)]
    for name, rate in zip(("base", "gd-run"), rates):
        assert np.isclose(value(p.cells[(name, "success_rate")]), rate)


def test_dead_unit_collapse_is_flagged(runs_root: Path, page: Page) -> None:
    collapsed = make_run_dir(runs_root, "collapsed", seeds=4, dead_unit_share=1.0, rng_seed=2)
    assert "warn-dead-units" in Page(render_report([collapsed]).read_text()).ids
    assert "warn-dead-units" not in page.ids


def test_results_order_does_not_matter(runs_root: Path) -> None:
    run_dir = make_run_dir(runs_root, "shuffled", seeds=3, digits=(1, 2))
    results = pd.read_parquet(run_dir / "results.parquet")
    rewrite_results(run_dir, results.sample(frac=1.0, random_state=0))
    run = load_run(run_dir)
    shards = trajectories(run_dir)
    ids, p = list(shards.run_ids), shards.field("p_target")
    for _, row in run.results.iterrows():
        assert np.array_equal(run.p_target[row["traj_row"]], p[ids.index(row["run_id"])])
        assert np.isclose(run.p_target[row["traj_row"], 0], row["p_target_start"])


@pytest.mark.parametrize("shards", [1, 3])
def test_streamed_snapshots_equal_loaded(runs_root: Path, shards: int) -> None:
    run_dir = make_run_dir(runs_root, f"streamed-{shards}", seeds=4, shards=shards)
    snaps = trajectories(run_dir).load()[0].snapshots
    rows = [0, 7, 8, 13, 14, len(snaps) - 1]
    picked, norms = read_snapshots(trajectories(run_dir), rows, 0, chunk_rows=8)
    assert len(trajectories(run_dir).paths) == shards and sorted(picked) == rows
    for r in rows:
        assert np.array_equal(picked[r], snaps[r].astype(np.float32))
    assert np.allclose(norms, np.linalg.norm(snaps[:, 0].astype(np.float32).reshape(len(snaps), -1), axis=1), rtol=1e-5)


def test_bad_run_dirs_name_the_problem(runs_root: Path, tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="nope: run directory not found"):
        render_report([tmp_path / "nope"])
    broken = make_run_dir(tmp_path, "broken", seeds=2, digits=(1,))
    rewrite_results(broken, pd.read_parquet(broken / "results.parquet").drop(columns=["l2_final"]))
    with pytest.raises(EightgenError, match=r"results\.parquet: missing columns l2_final"):
        render_report([broken])
    (broken / "trajectories" / "part-00000.npz").unlink()
    with pytest.raises(EightgenError, match="trajectories/part-00000.npz is missing"):
        load_run(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EightgenError, match=r"config\.json: not a valid run record"):
        load_run(broken)


def test_a_damaged_file_is_never_rendered(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "damaged", seeds=2, digits=(1,))
    data = bytearray((run_dir / "results.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run_dir / "results.parquet").write_bytes(bytes(data))
    assert not (run_dir / "report.html").exists()  # the fixture renders no report
    with pytest.raises(EightgenError, match=r"results\.parquet: sha256 differs"):
        render_report([run_dir])
    assert not (run_dir / "report.html").exists()


def test_kaplan_meier_matches_direct_product() -> None:
    rng = np.random.default_rng(0)
    horizon, n = 30, 200
    when = rng.integers(0, horizon + 1, n)
    observed = rng.uniform(size=n) < 0.7
    curve = stats.kaplan_meier(when, observed, horizon)
    surv, expected = 1.0, []
    for t in range(horizon + 1):
        at_risk = np.sum(when >= t)
        events = np.sum((when == t) & observed)
        surv *= 1 - events / at_risk if at_risk else 1
        expected.append(surv)
    assert np.allclose(curve, expected, atol=1e-12, rtol=0)
    # Censored only at the budget's end: the curve is the plain share not yet flipped.
    flips = rng.integers(0, horizon + 1, n)
    flipped = rng.uniform(size=n) < 0.6
    curve = stats.kaplan_meier(np.where(flipped, flips, horizon), flipped, horizon)
    plain = [1 - np.mean(flipped & (flips <= t)) for t in range(horizon + 1)]
    assert np.allclose(curve, plain, atol=1e-12, rtol=0)


def test_kaplan_meier_band_is_log_log_greenwood() -> None:
    """The band equals exp(-exp(log(-log S) ± z·σ)) with Greenwood's σ, computed here step by step."""
    rng = np.random.default_rng(3)
    horizon, n = 25, 60
    when = rng.integers(1, horizon + 1, n)
    observed = rng.uniform(size=n) < 0.6
    curve, lo, hi = stats.survival_band(when, observed, horizon)
    z = 1.959963984540054
    surv, green = 1.0, 0.0
    for t in range(horizon + 1):
        at_risk, events = np.sum(when >= t), np.sum((when == t) & observed)
        if events:
            surv *= 1 - events / at_risk
            green += events / (at_risk * (at_risk - events)) if at_risk > events else np.inf
        assert curve[t] == pytest.approx(surv, abs=1e-12)
        if 0 < surv < 1:
            sigma = np.sqrt(green) / abs(np.log(surv))
            assert lo[t] == pytest.approx(np.exp(-np.exp(np.log(-np.log(surv)) + z * sigma)), abs=1e-9)
            assert hi[t] == pytest.approx(np.exp(-np.exp(np.log(-np.log(surv)) - z * sigma)), abs=1e-9)
            assert lo[t] < surv < hi[t]
    # Nothing flipped: the curve stays at 1; every start flipped at once: it drops to 0.
    ones = stats.survival_band(np.full(5, 10), np.zeros(5, bool), 10)
    assert all(np.array_equal(b, np.ones(11)) for b in ones)
    drop, lo, hi = stats.survival_band(np.full(5, 3), np.ones(5, bool), 6)
    assert drop.tolist() == [1, 1, 1, 0, 0, 0, 0] and np.isfinite(lo).all() and np.isfinite(hi).all()


def test_exact_interval_never_zero_width() -> None:
    from scipy.stats import beta

    for k, n in [(0, 32), (32, 32), (1, 8), (7, 8), (150, 320), (0, 1)]:
        share = stats.share_ci(np.arange(n) < k)
        assert share["k"] == k and share["n"] == n and share["share"] == k / n
        assert share["hi"] - share["lo"] > 0.01
        # Clopper–Pearson: beta quantiles, with the open end at 0 or 1.
        lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
        hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
        assert share["lo"] == pytest.approx(lo, abs=1e-9) and share["hi"] == pytest.approx(hi, abs=1e-9)
    assert stats.rate_ci(32, 32)[0] == pytest.approx(0.025 ** (1 / 32), abs=1e-12)  # about 89%
    assert np.isnan(stats.rate_ci(0, 0)).all()
    assert stats.at_least(stats.share_ci(np.ones(32, bool)), 0.85) and not stats.at_least(stats.share_ci(np.ones(32, bool)), 0.90)
    assert stats.at_most(stats.share_ci(np.zeros(100, bool)), 0.05) and not stats.at_most(stats.share_ci(np.zeros(20, bool)), 0.05)


def test_group_table_gives_every_share_an_interval() -> None:
    rng = np.random.default_rng(2)
    n = 24
    results = pd.DataFrame(
        {
            "start_kind": ["noise"] * 8 + ["digit"] * 16, "start_digit": [None] * 8 + [3] * 8 + [5] * 8,
            "success": [True] * 8 + list(rng.uniform(size=16) < 0.5), "flip_step": [4.0] * 8 + [np.nan] * 16, "steps": [20] * n,
            "l2_at_flip": rng.uniform(size=n), "l2_final": rng.uniform(size=n), "linf_final": rng.uniform(size=n),
            "p_target_start": rng.uniform(size=n), "p_target_final": rng.uniform(size=n), "grad_norm_final": np.zeros(n),
        }
    )
    table = stats.group_table(results)
    noise = table[table["group"] == "noise"].iloc[0]
    assert noise["success_rate"] == 1.0 and noise["success_lo"] == pytest.approx(0.025 ** (1 / 8)) and noise["success_hi"] == 1.0
    for col in [c for c in table if c.endswith("_share")]:
        rows = table[table[col].notna()]  # a share among none (e.g. of no flips) has no value and no interval
        assert len(rows) and table.loc[table[col].isna(), col + "_lo"].isna().all(), col
        assert (rows[col + "_lo"] <= rows[col]).all() and (rows[col] <= rows[col + "_hi"]).all(), col
        assert (rows[col + "_hi"] - rows[col + "_lo"] > 0).all(), col  # never zero-width, even at 0 of n or n of n


def test_renders_500_starts_quickly(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "wide", seeds=50)
    start = time.perf_counter()
    out = render_report([run_dir])
    seconds = time.perf_counter() - start
    assert seconds < 60
    assert out.stat().st_size < 5_000_000
    p = Page(out.read_text())
    assert value(p.cells[("all", "n")]) == 500
    assert len(p.strips) == 10 * load_run(run_dir).report.strips_per_digit


def test_fixture_agrees_with_the_pipeline_results(run_dir: Path) -> None:
    from eightgen.attack.metrics import results_frame
    from eightgen.data.grid import META_COLUMNS
    traj, ids = trajectories(run_dir).load()
    fixture = pd.read_parquet(run_dir / "results.parquet")
    assert list(ids) == list(fixture["run_id"])
    x0 = traj.snapshots[:, 0].astype(np.float32)
    real = results_frame(traj, x0, fixture[list(META_COLUMNS)], model_name="small_cnn", method="seed", target=8)
    assert set(real.columns) == set(fixture.columns)
    for col in ("success", "flip_step", "stays_flipped", "n_reflips", "step_p50", "step_p90", "censored",
                "grad_zero_final", "saturated_start", "steps", "steps_run"):
        assert real[col].astype(object).equals(fixture[col].astype(object)), col
    assert np.allclose(real["l2_final"], fixture["l2_final"], rtol=1e-2)


def test_a_report_aimed_at_a_folder_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "aimed", seeds=2, digits=(1,))
    folder = tmp_path / "reports"
    folder.mkdir()
    with pytest.raises(EightgenError, match="is a directory: give a file name for the report"):
        render_report([run_dir], folder)
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
