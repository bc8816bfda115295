"""The runs index: scanning a runs folder, the history of versions, index.html, `eightgen runs`, and /compare."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from fixtures_report import make_run_dir
from scipy.stats import binomtest

from cli.main import main
from eightgen.artifacts import MANIFEST, write_manifest
from eightgen.rundir import RESULTS, load_record, trajectories, write_run
from reports.files import ALIGNED_MANIFEST, INDEX
from reports.history import HISTORY, read_history
from reports.index import scan
from reports.index_page import compare_page, refresh_index
from runtime.httpd import Pages, ReportServer

JAN, FEB, MAR = (datetime(2025, m, 1, 12, tzinfo=timezone.utc) for m in (1, 2, 3))


def _share(k: int, n: int) -> dict:
    ci = binomtest(k, n).proportion_ci(method="exact")
    return {"share": k / n, "lo": ci.low, "hi": ci.high, "k": k, "n": n}


def _rewrite(run_dir: Path, created: datetime, *, flip: int = 0, model: str | None = None) -> None:
    """A new version of a run in the same directory: another time, `flip` more failures, maybe another model hash."""
    record = load_record(run_dir)
    update = {"created": created}
    if model:
        update["model"] = record.model.model_copy(update={"sha256": model})
    results = pd.read_parquet(run_dir / RESULTS)
    hits = results.index[results["success"]][:flip]
    results.loc[hits, "success"] = False
    write_run(run_dir, record.model_copy(update=update), results, trajectories(run_dir).paths)


def _aligned(root: Path, when: datetime) -> Path:
    """A finished aligned experiment as the index reads it: aligned.json and .html, its manifest, one judged sub-run."""
    d = root / "aligned-0a1b2c3d"
    make_run_dir(d, "robust-eps2", seeds=2)
    knn = _share(30, 36)
    cell = {"detector": "robust", "radius": 2.0, "budget": 2.0, "run": "robust-eps2",
            "digits": {"n": 36, "referees": {"knn": knn}}, "noise": {"n": 4, "referees": {"knn": _share(1, 4)}}}
    summary = {"dataset": "mnist", "target": 8, "target_name": "8", "matched_budget": 2.0, "cells": [cell],
               "targets": [{"key": "knn_robust", "value": knn["share"], "lo": knn["lo"], "hi": knn["hi"], "k": 30, "n": 36}]}
    (d / "aligned.json").write_text(json.dumps(summary))
    (d / "aligned.html").write_text("<!doctype html><title>aligned</title>")
    write_manifest(d, {"kind": "aligned-report"}, ["aligned.html", "aligned.json"], name=ALIGNED_MANIFEST)
    os.utime(d / ALIGNED_MANIFEST, (when.timestamp(), when.timestamp()))
    return d


def _diffusion(root: Path, when: datetime) -> Path:
    """A finished diffusion experiment as the index reads it: diffusion.json and .html and their manifest."""
    d = root / "diffusion-4e5f6a7b"
    d.mkdir(parents=True)
    cells = [{"path": "diffusion-robust", "kind": "noise", "n": 8, "knn10": _share(7, 8)},
             {"path": "diffusion-robust", "kind": "digit", "n": 16, "knn10": _share(12, 16)},
             {"path": "robust-gradient", "kind": "noise", "n": 8, "knn10": _share(2, 8)}]
    summary = {"target": 8, "target_name": "8", "cells": cells, "facts": {"ddim_steps": 20, "detectors": {"robust": "c" * 12}, "dataset": "d" * 12}}
    (d / "diffusion.json").write_text(json.dumps(summary))
    (d / "diffusion.html").write_text("<!doctype html><title>diffusion</title>")
    write_manifest(d, {"kind": "diffusion"}, ["diffusion.html", "diffusion.json"])
    os.utime(d / MANIFEST, (when.timestamp(), when.timestamp()))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A runs folder with two plain runs (January, March), an aligned (February) and a diffusion experiment (December)."""
    root = tmp_path / "runs"
    _rewrite(make_run_dir(root, "quick-11111111", seeds=3), JAN)
    _rewrite(make_run_dir(root, "quick-22222222", seeds=2, rng_seed=1), MAR)
    _aligned(root, FEB)
    _diffusion(root, datetime(2024, 12, 1, tzinfo=timezone.utc))
    return root


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a" and dict(attrs).get("class") == "report":
            self.hrefs.append(dict(attrs)["href"])


def test_scan_lists_every_kind_newest_first_with_its_headline(root: Path) -> None:
    entries = scan(root)
    assert [(e.name, e.kind) for e in entries] == [
        ("quick-22222222", "run"), ("aligned-0a1b2c3d", "aligned"), ("quick-11111111", "run"), ("diffusion-4e5f6a7b", "diffusion")
    ]
    run, aligned, _, diffusion = entries
    assert run.headline.startswith("success") and run.dataset == "MNIST" and run.target == "8" and run.starts == 20
    assert run.flip_median is not None and run.comparable and run.report is None  # the fixture renders no report
    assert "k-NN 8 share" in aligned.headline and aligned.starts == 40 and aligned.method == "seed" and not aligned.comparable
    assert (aligned.share.k, aligned.share.n, aligned.report) == (30, 36, "aligned-0a1b2c3d/aligned.html")
    assert "robust-guided diffusion from noise" in diffusion.headline and (diffusion.share.k, diffusion.share.n) == (7, 8)
    assert diffusion.dataset == "MNIST" and diffusion.starts == 24


def test_every_share_is_the_exact_interval_of_the_stored_rows(root: Path) -> None:
    for e in scan(root):
        if e.kind == "run":
            success = pd.read_parquet(root / e.name / RESULTS)["success"]
            k, n = int(success.sum()), len(success)
        else:
            k, n = e.share.k, e.share.n
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert (e.share.k, e.share.n) == (k, n)
        assert e.share.lo == pytest.approx(ci.low) and e.share.hi == pytest.approx(ci.high)
        assert e.share.lo < e.share.hi  # never zero-width


def test_runs_command_prints_one_line_each_and_json(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "--runs-root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["quick-22222222", "aligned-0a1b2c3d", "quick-11111111", "diffusion-4e5f6a7b"]
    assert re.search(r"success: share of starts .* \d+\.\d% \[\d+\.\d–\d+\.\d\], \d+ of 20\s+median flip step", lines[0])
    assert str(root / "aligned-0a1b2c3d" / "aligned.html") in lines[1]
    assert main(["runs", "--runs-root", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["kind"] for e in listed] == ["run", "aligned", "run", "diffusion"]
    assert listed[0]["share"]["n"] == 20 and listed[0]["comparable"] and not listed[1]["comparable"]


def test_a_missing_runs_folder_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "--runs-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eightgen: error: no runs folder at")


def test_a_nightly_name_gets_a_trend_once_it_has_two_versions(root: Path) -> None:
    page = refresh_index(root)
    assert "Over time" not in page.read_text()
    versions, bad = read_history(root)
    assert len(versions) == 4 and bad == []
    refresh_index(root)
    assert len(read_history(root)[0]) == 4  # the same versions are not recorded twice
    _rewrite(root / "quick-11111111", datetime(2025, 4, 1, 3, tzinfo=timezone.utc), flip=3, model="e" * 64)
    html = refresh_index(root).read_text()
    versions = [v for v in read_history(root)[0] if v.name == "quick-11111111"]
    assert len(versions) == 2 and versions[0].share.k - versions[1].share.k == 3
    assert versions[1].model_sha256 == "e" * 64
    trend = html.split('id="trend-quick-11111111"')[1].split("</table>")[0]
    assert trend.count("<circle") == 2 and "model" in trend  # what changed between the versions
    for v in versions:
        assert f"{v.share.k} of {v.share.n}" in trend
    assert 'id="trend-quick-22222222"' not in html


def test_concurrent_refreshes_keep_one_whole_line_per_version(root: Path) -> None:
    threads = [threading.Thread(target=refresh_index, args=(root,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (root / HISTORY).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["name"] for line in lines)


def test_damaged_runs_and_history_lines_are_listed_not_fatal(root: Path) -> None:
    (root / "quick-22222222" / RESULTS).write_bytes(b"not parquet")
    (root / "aligned-0a1b2c3d" / "aligned.json").write_text("{")
    (root / "empty").mkdir()
    (root / HISTORY).write_text('{"name": "x"\n')  # a writer killed mid-line
    entries = {e.name: e for e in scan(root)}
    assert entries["quick-22222222"].kind == "unreadable" and "sha256 differs" in entries["quick-22222222"].reason
    assert entries["aligned-0a1b2c3d"].kind == "unreadable" and "aligned.json" in entries["aligned-0a1b2c3d"].reason
    assert entries["empty"].kind == "unreadable" and "\n" not in entries["empty"].reason
    html = refresh_index(root).read_text()
    assert "Unreadable" in html and "line 1" in html and "sha256 differs" in html
    lines = (root / HISTORY).read_text().splitlines()
    assert lines[0] == '{"name": "x"' and all(json.loads(line) for line in lines[1:]) and len(lines) == 3


def test_index_links_every_report_that_exists(root: Path) -> None:
    (root / "quick-11111111" / "report.html").write_text("<!doctype html>")
    page = refresh_index(root)
    html = page.read_text()
    links = _Links()
    links.feed(html)
    assert sorted(links.hrefs) == ["aligned-0a1b2c3d/aligned.html", "diffusion-4e5f6a7b/diffusion.html", "quick-11111111/report.html"]
    assert all((page.parent / h).is_file() for h in links.hrefs)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained
    assert html.count('class="pick"') == 2  # plain runs only can be compared


@pytest.mark.slow
def test_compare_endpoint_renders_the_comparison_and_refuses_other_names(root: Path) -> None:
    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(server.url + path, timeout=120) as r:
                return r.status, r.url, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, "", exc.read().decode()

    with ReportServer(root, pages=Pages(index=refresh_index, compare=compare_page)) as server:
        status, _, body = get("/")
        assert status == 200 and "eightgen runs" in body and "/compare?" in body
        status, url, body = get("/compare?run=quick-11111111&run=quick-22222222")
        assert status == 200 and url.endswith("/compare-quick-11111111--quick-22222222.html") and "comparison" in body
        assert (root / "compare-quick-11111111--quick-22222222.html").is_file()
        for bad in ("run=..&run=quick-11111111", "run=..%2Fruns%2Fquick-11111111&run=quick-22222222",
                    "run=aligned-0a1b2c3d&run=quick-11111111", "run=quick-11111111"):
            status, _, body = get("/compare?" + bad)
            assert status == 400 and body.count("\n") == 1, (bad, body)


def test_a_real_pipeline_run_leaves_an_index_linking_its_report(prefect_harness, mnist_dir: Path, tmp_path_factory) -> None:
    from helpers import run_pipeline, shared_cache, tiny_config

    cache = shared_cache(tmp_path_factory)
    runs = tmp_path_factory.mktemp("index-runs")
    cfg = tiny_config(mnist_dir, cache, runs)
    run_pipeline(cfg, cache)
    links = _Links()
    links.feed((runs / INDEX).read_text())
    assert links.hrefs == [f"{cfg.run_dir.name}/report.html"] and (runs / links.hrefs[0]).is_file()
    assert [v.name for v in read_history(runs)[0]] == [cfg.run_dir.name]


def test_an_index_failure_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from tasks import index

    warned: list[str] = []

    class Log(logging.Logger):
        def warning(self, msg: str, *args: object, **kwargs: object) -> None:
            warned.append(msg % args)

    monkeypatch.setattr(index, "_logger", lambda: Log("test"))
    assert index.refresh_runs_index(tmp_path / "nowhere") is None
    assert len(warned) == 1 and re.search(r"runs index of .* not refreshed: EightgenError: no runs folder", warned[0])
