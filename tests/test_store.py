"""Storage by URL on a real S3-compatible server: publishing with the manifest last, fetching into this host's copy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from upath import UPath

from eightgen.artifacts import MANIFEST, Artifact, artifact_of, read_manifest, staged_dir, verified, write_manifest
from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import SCRATCH_ENV, check_writable, fetch, is_url, local, location, mirror, publish


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy folder: nothing is shared with another test's."""
    folder = tmp_path / "scratch"
    monkeypatch.setenv(SCRATCH_ENV, str(folder))
    return folder


def _output(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_manifest(folder, {"kind": "test"}, list(files))
    return folder


def test_locations_keep_local_paths_as_they_were_and_name_urls_whole() -> None:
    assert location("runs") == Path("runs") and type(location("runs")) is type(Path("runs"))
    assert not is_url("runs") and not is_url(Path("/x")) and is_url("s3://b/p") and is_url(UPath("s3://b/p"))
    url = ExperimentConfig(cache_dir="s3://bucket/cache", runs_root="s3://bucket/runs")
    dumped = json.loads(url.model_dump_json())
    assert dumped["cache_dir"] == "s3://bucket/cache" and dumped["runs_root"] == "s3://bucket/runs"
    assert str(ExperimentConfig.model_validate(dumped).run_dir) == f"s3://bucket/runs/{url.run_label}"
    plain = ExperimentConfig()
    assert json.loads(plain.model_dump_json())["cache_dir"] == ".eightgen-cache"
    assert ExperimentConfig.model_validate_json(plain.model_dump_json()) == plain
    # an Artifact in a store travels as its URL, whatever host reads it
    artifact = Artifact(path="s3://bucket/cache/attacks/abc", sha256="0" * 64)
    assert Artifact.model_validate_json(artifact.model_dump_json()) == artifact


def test_publish_then_fetch_round_trip(bucket: str, tmp_path: Path, scratch: Path) -> None:
    made = _output(tmp_path / "made", {"a.bin": b"alpha", "sub/b.bin": b"beta" * 1000})
    url = UPath(f"{bucket}/cache/models/x1")
    publish(made, url)
    here = fetch(url, MANIFEST)
    assert here == mirror(url) == local(url) and here.is_relative_to(scratch)
    assert (here / "sub/b.bin").read_bytes() == b"beta" * 1000
    assert artifact_of(url) == Artifact(path=url, sha256=artifact_of(made).sha256)
    assert verified(artifact_of(url)) == here


def test_a_copy_that_matches_is_not_downloaded_again(bucket: str, tmp_path: Path) -> None:
    made = _output(tmp_path / "made", {"a.bin": b"alpha"})
    url = UPath(f"{bucket}/c/d")
    publish(made, url)
    here = fetch(url, MANIFEST)
    before = (here / "a.bin").stat().st_mtime_ns
    fetch(url, MANIFEST)
    assert (here / "a.bin").stat().st_mtime_ns == before
    (here / "a.bin").write_bytes(b"edited here")  # a damaged copy is fetched again from the store
    assert (fetch(url, MANIFEST) / "a.bin").read_bytes() == b"alpha"


def test_files_without_their_manifest_are_not_an_output(bucket: str, tmp_path: Path) -> None:
    """A writer stopped halfway published files but no manifest: nobody takes it for a finished output."""
    made = _output(tmp_path / "made", {"a.bin": b"alpha"})
    url = UPath(f"{bucket}/half/x")
    url.fs.put_file(str(made / "a.bin"), f"{url.path}/a.bin")
    with pytest.raises(EightgenError, match="no manifest.json"):
        fetch(url, MANIFEST)
    # a republish takes the old manifest away first: a reader sees an unfinished output, never old and new mixed
    publish(made, url)
    (made / "a.bin").write_bytes(b"other")
    write_manifest(made, {"kind": "test"}, ["a.bin"])
    url.fs.rm_file(f"{url.path}/{MANIFEST}")
    url.fs.put_file(str(made / "a.bin"), f"{url.path}/a.bin")
    with pytest.raises(EightgenError, match="unfinished"):
        read_manifest(url)


def test_a_corrupt_object_in_the_store_is_caught(bucket: str, tmp_path: Path) -> None:
    made = _output(tmp_path / "made", {"a.bin": b"alpha"})
    url = UPath(f"{bucket}/bad/x")
    publish(made, url)
    url.fs.pipe_file(f"{url.path}/a.bin", b"flipped")
    with pytest.raises(EightgenError, match="sha256 differs"):
        read_manifest(url)


def test_staged_dir_at_a_url_replaces_the_old_output_whole(bucket: str) -> None:
    url = UPath(f"{bucket}/cache/attacks/y")
    with staged_dir(url) as tmp:
        (tmp / "old.bin").write_bytes(b"1")
        write_manifest(tmp, {}, ["old.bin"])
    with staged_dir(url) as tmp:
        (tmp / "new.bin").write_bytes(b"2")
        write_manifest(tmp, {}, ["new.bin"])
    names = sorted(Path(p).name for p in url.fs.find(url.path))
    assert names == [MANIFEST, "new.bin"]
    assert read_manifest(url)["files"].keys() == {"new.bin"}


def test_a_store_that_refuses_writes_is_named_in_one_line(s3_server: str) -> None:
    with pytest.raises(EightgenError, match=r"--cache-dir s3://no-such-bucket-here/c: the store refuses a write"):
        check_writable(UPath("s3://no-such-bucket-here/c"), "--cache-dir")


def test_a_report_link_of_a_run_in_the_store_is_a_presigned_url_a_browser_can_open(bucket: str, tmp_path: Path) -> None:
    import urllib.request

    from runtime.httpd import report_link

    run = _output(tmp_path / "run", {"report.html": b"<!doctype html><title>r</title>"})
    url = UPath(f"{bucket}/runs/some-run")
    publish(run, url)
    link = report_link(url)
    assert link is not None and link.startswith("http") and "Signature" in link
    with urllib.request.urlopen(link, timeout=10) as answer:  # a plain GET, without the credentials of the writer
        assert answer.read() == b"<!doctype html><title>r</title>"
        assert answer.headers["Content-Type"] == "text/html"


def test_runs_in_the_store_are_found_listed_and_read_back(bucket: str, tmp_path: Path) -> None:
    from eightgen.rundir import find_run, local_runs, verify_run
    from fixtures_report import make_run_dir
    from reports.runs import load_run

    for name in ("older", "newer"):
        publish(make_run_dir(tmp_path / "made", name, seeds=2, digits=(1, 3), steps=10), UPath(f"{bucket}/runs/{name}"))
        time.sleep(1.1)  # the store's modification times have whole seconds
    root = UPath(f"{bucket}/runs")
    assert str(find_run(root)) == f"{bucket}/runs/newer" and str(find_run(root, "older")) == f"{bucket}/runs/older"
    with pytest.raises(EightgenError, match="no run named 'gone'"):
        find_run(root, "gone")
    here = local_runs(root)
    assert sorted(p.name for p in here.iterdir()) == ["newer", "older"]
    assert verify_run(here / "older").sha256 == verify_run(tmp_path / "made" / "older").sha256
    assert load_run(root / "older").results.equals(load_run(tmp_path / "made" / "older").results)
    UPath(f"{bucket}/runs/older").fs.rm(f"{bucket[5:]}/runs/older", recursive=True)
    assert sorted(p.name for p in local_runs(root).iterdir()) == ["newer"]  # a copy of a run gone from the store goes too


@pytest.mark.parametrize("option", ["--cache-dir", "--runs-root"])
def test_a_bucket_that_is_not_there_stops_the_run_in_one_line_before_any_work(
    option: str, s3_server: str, mnist_dir: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from cli.main import main

    from runtime.environment import STORAGE_BLOCK

    monkeypatch.chdir(tmp_path)
    for name in (STORAGE_BLOCK, "PREFECT_LOCAL_STORAGE_PATH"):  # what the command sets for itself is undone after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    other = "--runs-root" if option == "--cache-dir" else "--cache-dir"
    argv = ["run", "--mnist-dir", str(mnist_dir), option, "s3://no-such-bucket-here/x", other, str(tmp_path / "local")]
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
        code = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"eightgen: error: {option} s3://no-such-bucket-here/x: the store refuses a write"), err
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").rglob("manifest.json"))


def test_the_store_benchmark_counts_the_requests_of_its_own_server_by_what_they_touch(tmp_path: Path) -> None:
    import s3fs

    from benchmarks.store import requests, start_s3

    server, endpoint, log = start_s3(tmp_path)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True)
        fs.mkdir("bench")
        start = log.stat().st_size
        fs.pipe_file("bench/cache/attacks/abc/manifest.json", b"{}")
        fs.pipe_file("bench/runs/r/report.html", b"<html>")
        fs.cat_file("bench/cache/attacks/abc/manifest.json")
        fs.ls("bench/cache/attacks")
        time.sleep(0.5)  # the server's log line of the last request
        methods, places, end = requests(log, start)
    finally:
        server.kill()
        server.wait()
    assert methods["PUT"] == 2 and methods["GET"] >= 2 and end == log.stat().st_size
    assert places["runs"] == 1 and places["attacks"] >= 3 and "prefect-results" not in places
