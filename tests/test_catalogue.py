"""A catalogue of bad inputs: every command refuses each with exit code 2 and one line naming the problem,
never a traceback, and a finished run directory stays as it was, byte for byte.

Most cases fail in the checks before any work and run in-process through `cli.main.main`, with no Prefect
server started for them; a few run as real subprocesses to show what a terminal sees. A run whose Prefect
task fails shows what Prefect's console handler writes: its log lines, no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import TINY, shared_cache

from cli.main import main
from runtime.embedded import IDLE
from runtime.errorlog import ErrorLog, log_name
from runtime.preflight import check_space, space_needed

ROOT = Path(__file__).resolve().parents[1]
PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| ")


class Finished(NamedTuple):
    runs: Path  # the runs root holding one finished run
    run: Path  # that run directory
    cache: Path
    files: dict[str, bytes]  # every file under runs, as it was after the run


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": b"" for p in sorted(root.rglob("*")) if p.is_dir()
    }


def _failing_run(argv: list[str], marker: Path) -> tuple[int, str, str]:
    """`main(argv)` with the first optimize-chunk task raising: its exit code, Prefect's console output and stderr."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.faults import FAIL_ONCE, FAIL_ONCE_MARKER

    terminal, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_ONCE, "optimize-chunk")
        mp.setenv(FAIL_ONCE_MARKER, str(marker))
        ensure_logging_setup()  # Prefect's console handler, as the first flow would set it up
        consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
        assert consoles
        for handler in consoles:  # what it writes is what a terminal would show
            mp.setattr(handler.console, "file", terminal)
        with contextlib.redirect_stderr(err):
            code = main(argv)
    return code, terminal.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(prefect_harness, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """One tiny real run, made once for the module (on the session's Prefect API)."""
    base = tmp_path_factory.mktemp("catalogue")
    runs, cache = base / "runs", shared_cache(tmp_path_factory)
    argv = ["run", *TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(cache), "--runs-root", str(runs), "--run-name", "finished"]
    assert main(argv) == 0
    return Finished(runs, runs / "finished", cache, _files(runs))


@pytest.fixture(scope="module")
def failed(finished: Finished, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str]:
    """A tiny run whose optimisation task fails: exit code, what Prefect's console showed, stderr."""
    base = tmp_path_factory.mktemp("failed")
    argv = ["run", *TINY, "--mnist-dir", str(mnist_dir), "--cache-dir", str(finished.cache), "--runs-root", str(base / "runs")]
    return _failing_run([*argv, "--chunk-size", "6"], base / "fired")  # one chunk


def _mnist_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.glob("t10k-*"):
        shutil.copy(f, dst / f.name)
    return dst


def _rewrite(path: Path, change) -> None:
    path.write_bytes(gzip.compress(change(bytearray(gzip.decompress(path.read_bytes()))), mtime=0))


@pytest.fixture(scope="module")
def places(finished: Finished, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The bad inputs the cases name, made once: {name} in a case's argv is replaced by places[name]."""
    base = tmp_path_factory.mktemp("bad")
    (base / "empty").mkdir()
    (base / "a-file").write_text("not a folder\n")
    truncated = _mnist_copy(mnist_dir, base / "truncated") / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:50_000])
    _rewrite(_mnist_copy(mnist_dir, base / "magic") / "t10k-images-idx3-ubyte.gz", lambda b: b"\x12\x34" + bytes(b[2:]))
    (_mnist_copy(mnist_dir, base / "unlabelled") / "t10k-labels-idx1-ubyte.gz").unlink()

    def no_eights(b: bytearray) -> bytes:
        return bytes(b[:8]) + bytes(3 if v == 8 else v for v in b[8:])

    _rewrite(_mnist_copy(mnist_dir, base / "no-eights") / "t10k-labels-idx1-ubyte.gz", no_eights)
    _rewrite(
        _mnist_copy(mnist_dir, base / "short-labels") / "t10k-labels-idx1-ubyte.gz",
        lambda b: bytes(b[:4]) + (9_999).to_bytes(4, "big") + bytes(b[8:-1]),
    )
    for name in ("damaged-results", "damaged-manifest", "no-config"):
        shutil.copytree(finished.run, base / name)
    results = base / "damaged-results" / "results.parquet"
    results.write_bytes(results.read_bytes()[:-100])
    (base / "damaged-manifest" / "manifest.json").write_text("{not json")
    (base / "no-config" / "config.json").unlink()
    (base / "other-runs" / "junk").mkdir(parents=True)
    (base / "other-runs" / "junk" / "notes.txt").write_text("mine\n")
    (base / "other-runs" / "taken").write_text("a file\n")
    (base / "locked").mkdir()
    (base / "torch-home").mkdir()
    return {
        "tmp": str(base), "mnist": str(mnist_dir), "runs": str(finished.runs), "cache": str(finished.cache), "run": str(finished.run),
        **{p.name: str(p) for p in base.iterdir()},
    }


@pytest.fixture(autouse=True)
def unchanged(finished: Finished):
    """After every case, the finished run (and everything under its runs root) is exactly as it was."""
    yield
    assert _files(finished.runs) == finished.files


def _where(command: str) -> list[str]:
    if command == "report":
        return []
    return ["--mnist-dir", "{mnist}", "--runs-root", "{runs}", "--cache-dir", "{cache}"]


BASE = {"run": ["run", *TINY], "serve": ["serve", *TINY], "aligned": ["aligned", "--epochs", "1", "--seeds", "2", "--steps", "4", "--budgets", "1,2", "--matched-budget", "2"], "report": ["report"]}

# (id, command, extra argv, needle in the error line); "usage" cases are argparse's own (usage + error line).
CASES = [
    # settings that do not exist
    ("unknown-preset", "run", ["--preset", "nope"], "unknown preset 'nope'"),
    ("unknown-arch", "run", ["--arch", "vgg"], "train.arch"),
    ("unknown-method", "run", ["--method", "sideways"], "attack.method"),
    ("unknown-loss", "run", ["--loss", "hinge"], "attack.loss"),
    ("unknown-device", "run", ["--device", "tpu"], "attack.device"),
    ("unknown-balance", "run", ["--balance", "some"], "usage:--balance: invalid choice"),
    ("unknown-source", "run", ["--source", "ftp"], "usage:--source: invalid choice"),
    ("unknown-task-runner", "run", ["--task-runner", "slurm"], "usage:--task-runner: invalid choice"),
    # numbers: negative, zero, inf, nan, not a number
    ("seeds-negative", "run", ["--seeds", "-3"], "attack.seeds"),
    ("seeds-zero", "run", ["--seeds", "0"], "attack.seeds"),
    ("seeds-inf", "run", ["--seeds", "inf"], "usage:--seeds: invalid int value: 'inf'"),
    ("seeds-text", "run", ["--seeds", "many"], "usage:--seeds: invalid int value: 'many'"),
    ("seeds-beyond-pool", "run", ["--seeds", "100", "--pool-per-digit", "50"], "attack.seeds=100 starts per digit, but dataset.pool_per_digit holds out 50"),
    ("starts-beyond-split", "run", ["--starts-per-digit", "5000"], "pool_per_digit=5000 needs more"),
    ("starts-text", "run", ["--starts-per-digit", "many"], "usage:--starts-per-digit: expected a number or 'all'"),
    ("pool-all-one-split", "run", ["--pool-per-digit", "all"], "pool_per_digit='all' needs a source with a training and a test split"),
    ("steps-zero", "run", ["--steps", "0"], "attack.steps"),
    ("steps-negative", "run", ["--steps", "-5"], "attack.steps"),
    ("steps-nan", "run", ["--steps", "nan"], "usage:--steps: invalid int value: 'nan'"),
    ("epochs-zero", "run", ["--epochs", "0"], "train.epochs"),
    ("epochs-negative", "run", ["--epochs", "-1"], "train.epochs"),
    ("max-train-zero", "run", ["--max-train", "0"], "dataset.max_train"),
    ("max-train-text", "run", ["--max-train", "lots"], "usage:--max-train: invalid int value"),
    ("record-every-zero", "run", ["--record-every", "0"], "attack.record_every"),
    ("early-stop-negative", "run", ["--early-stop", "-2"], "attack.early_stop"),
    ("chunk-size-zero", "run", ["--chunk-size", "0"], "attack.chunk_size"),
    ("lr-negative", "run", ["--lr", "-0.5"], "attack.lr"),
    ("lr-zero", "run", ["--lr", "0"], "attack.lr"),
    ("lr-inf", "run", ["--lr", "inf"], "attack.lr: Input should be a finite number"),
    ("lr-nan", "run", ["--lr", "nan"], "attack.lr: Input should be a finite number"),
    ("lr-text", "run", ["--lr", "fast"], "usage:--lr: invalid float value: 'fast'"),
    ("eps-missing", "run", ["--method", "pgd_l2"], "needs eps"),
    ("eps-zero", "run", ["--method", "pgd_l2", "--eps", "0"], "attack.eps"),
    ("eps-negative", "run", ["--method", "pgd_linf", "--eps", "-1"], "attack.eps"),
    ("eps-inf", "run", ["--method", "pgd_l2", "--eps", "inf"], "attack.eps: Input should be a finite number"),
    ("eps-nan", "run", ["--method", "pgd_l2", "--eps", "nan"], "attack.eps: Input should be a finite number"),
    ("digits-out-of-range", "run", ["--digits", "1,12"], "start digits must be 0-9"),
    ("digits-repeat", "run", ["--digits", "3,3"], "start digits repeat"),
    ("digits-text", "run", ["--digits", "one"], "usage:digits must be comma-separated integers"),
    ("no-starts", "run", ["--digits", "none", "--no-noise"], "no starts"),
    ("disk-too-small", "run", ["--steps", "1000000000", "--record-every", "1"], "not enough disk space"),
    # MNIST that is missing, empty or damaged
    ("mnist-missing", "run", ["--mnist-dir", "{tmp}/nowhere"], "nowhere does not exist"),
    ("mnist-empty", "run", ["--mnist-dir", "{empty}"], "no MNIST IDX files"),
    ("mnist-a-file", "run", ["--mnist-dir", "{a-file}"], "a-file is a file, not a folder"),
    ("mnist-env-missing", "run", ["drop:--mnist-dir", "env:EIGHTGEN_MNIST_DIR={tmp}/elsewhere"], "elsewhere does not exist"),
    ("mnist-idx-without-dir", "run", ["drop:--mnist-dir", "--source", "idx"], "source 'idx' needs mnist_dir"),
    ("mnist-truncated", "run", ["--mnist-dir", "{truncated}"], "t10k-images-idx3-ubyte.gz"),
    ("mnist-wrong-magic", "run", ["--mnist-dir", "{magic}"], "t10k-images-idx3-ubyte.gz"),
    ("mnist-no-labels", "run", ["--mnist-dir", "{unlabelled}"], "has no partner t10k-labels"),
    ("mnist-short-labels", "run", ["--mnist-dir", "{short-labels}"], "holds 10000 images"),
    ("mnist-no-eights", "run", ["--mnist-dir", "{no-eights}"], "8"),
    ("local-path-missing", "run", ["--local-path", "{tmp}/nothing.parquet", "--source", "local"], "does not exist"),
    # folders
    ("runs-root-a-file", "run", ["--runs-root", "{a-file}/runs"], "is a file, not a folder"),
    ("cache-dir-a-file", "run", ["--cache-dir", "{a-file}/cache"], "is a file, not a folder"),
    ("runs-root-in-a-run-file", "run", ["--runs-root", "{run}/config.json"], "is a file, not a folder"),
    ("runs-root-unwritable", "run", ["--runs-root", "{locked}/runs"], "is not writable"),
    ("cache-dir-unwritable", "run", ["--cache-dir", "{locked}/cache"], "is not writable"),
    # run names that collide
    ("run-name-other-settings", "run", ["--run-name", "finished", "--steps", "7"], "holds a run of other settings (attack.steps: 5 there, 7 asked)"),
    ("run-name-a-file", "run", ["--runs-root", "{other-runs}", "--run-name", "taken"], "is a file, not a run directory"),
    ("run-name-not-a-run", "run", ["--runs-root", "{other-runs}", "--run-name", "junk"], "holds files that are not a readable run"),
    # accelerators and pretrained weights
    ("device-mps", "run", ["--device", "mps"], "MPS is not available"),
    ("device-cuda", "run", ["--device", "cuda"], "CUDA is not available"),
    ("pretrained-small-cnn", "run", ["--pretrained"], "small_cnn has no pretrained weights; pass --no-pretrained"),
    ("pretrained-unreachable", "run", ["--arch", "resnet18", "--pretrained"], "pass --no-pretrained, or put resnet18-"),
    # report
    ("report-missing", "report", ["{tmp}/nowhere"], "run directory not found"),
    ("report-not-a-run", "report", ["{empty}"], "config.json"),
    ("report-a-file", "report", ["{a-file}"], "a-file: a file, not a run directory"),
    ("report-damaged-results", "report", ["{damaged-results}"], "results.parquet"),
    ("report-damaged-manifest", "report", ["{damaged-manifest}"], "manifest.json"),
    ("report-no-config", "report", ["{no-config}"], "config.json"),
    ("report-out-a-folder", "report", ["{run}", "-o", "{empty}"], "empty is a directory: give a file name"),
    ("report-out-below-a-file", "report", ["{run}", "-o", "{a-file}/report.html"], "a-file is a file, not a folder"),
    ("report-no-run", "report", [], "usage:the following arguments are required: run_dirs"),
    # serve (checked before it looks for a Prefect server)
    ("serve-port-too-high", "serve", ["--reports-port", "70000"], "--reports-port 70000: a port is 0-65535"),
    ("serve-port-negative", "serve", ["--reports-port", "-1"], "--reports-port -1: a port is 0-65535"),
    ("serve-port-text", "serve", ["--reports-port", "http"], "usage:--reports-port: invalid int value"),
    ("serve-limit-zero", "serve", ["--limit", "0"], "--limit 0: at least 1"),
    ("serve-bad-cron", "serve", ["--cron", "61 * * * *"], "cron"),
    ("serve-bad-timezone", "serve", ["--timezone", "Mars/Olympus"], "Mars/Olympus"),
    ("serve-bad-settings", "serve", ["--seeds", "0"], "attack.seeds"),
    # aligned
    ("aligned-budget-unmatched", "aligned", ["--matched-budget", "5"], "matched_budget 5 is not one of the budgets"),
    ("aligned-budget-zero", "aligned", ["--budgets", "0,1", "--matched-budget", "1"], "budgets must be distinct positive numbers"),
    ("aligned-budget-text", "aligned", ["--budgets", "a,b"], "usage:expected comma-separated numbers"),
    ("aligned-referee-eps", "aligned", ["--referee-eps", "1"], "must exceed the robust detector's adv_eps"),
    ("aligned-referee-fraction", "aligned", ["--referee-fraction", "0"], "referee_fraction must be > 0"),
    ("aligned-grid-seeds", "aligned", ["--grid-seeds", "3"], "grid_seeds (3) exceeds attack.seeds (2)"),
    ("aligned-adv-eps-nan", "aligned", ["--adv-eps", "nan"], "robust.adv_eps: Input should be a finite number"),
    ("aligned-steps-zero", "aligned", ["--steps", "0"], "attack.steps"),
    ("aligned-device", "aligned", ["--device", "mps"], "MPS is not available"),
    ("aligned-mnist-missing", "aligned", ["--mnist-dir", "{tmp}/nowhere"], "does not exist"),
    ("aligned-cache-a-file", "aligned", ["--cache-dir", "{a-file}/cache"], "is a file, not a folder"),
]


def _argv(command: str, extra: list[str], places: dict[str, str]) -> list[str]:
    """The case's command line: the command's tiny settings and folders, then the case's own options
    (less the options it names as drop:OPTION, and without its env:NAME=VALUE settings)."""
    drop = {a.removeprefix("drop:") for a in extra if a.startswith("drop:")}
    where = _where(command)
    where = [x for pair in zip(where[::2], where[1::2]) if pair[0] not in drop for x in pair]
    own = [a for a in extra if not a.startswith(("drop:", "env:"))]
    return [a.format_map(places) for a in [*BASE[command], *where, *own]]


def assert_refused(code: int, out: str, err: str, needle: str) -> None:
    """Exit code 2, no traceback, and one line naming the problem (argparse: usage, then its error line)."""
    assert code == 2, err
    assert "Traceback" not in out + err, out + err
    lines = err.strip().splitlines()
    if needle.startswith("usage:"):
        assert lines[0].startswith("usage: eightgen") and ": error: " in lines[-1] and needle[6:] in lines[-1], err
        assert not [line for line in lines if ": error: " in line][:-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("eightgen: error: ") and needle in lines[0], err


def _in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize(("command", "extra", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(command, extra, needle, places, capfd, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EIGHTGEN_MNIST_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", places["torch-home"])  # no cached ImageNet weights
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where a command without a cache dir logs
    for name, value in (a.removeprefix("env:").split("=", 1) for a in extra if a.startswith("env:")):
        monkeypatch.setenv(name, value.format_map(places))
    if "CUDA" in needle:  # an accelerator asked for where there is none, on any machine
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if "put resnet18-" in needle:  # the weights probe fails here without a network; make it fail anywhere
        monkeypatch.setattr("eightgen.models.detector._reachable", lambda url, timeout: False)
    if "not writable" in needle:  # root may write anywhere: refuse this folder as a user without rights would be
        os.chmod(places["locked"], 0o500)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == places["locked"] else real_access(p, mode, **kw))
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    try:  # every case stops before its first flow: no local Prefect server needs to boot for it
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
            code, out, err = _in_process(_argv(command, extra, places), capfd)
    finally:
        os.chmod(places["locked"], 0o700)
    assert_refused(code, out, err, needle)


def test_the_catalogue_is_long_enough() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_pretrained_weights_fail_fast_offline(places, capfd, monkeypatch, tmp_path) -> None:
    """The seed preset asks for ImageNet weights: with none cached and no network, it stops before any work."""
    import time

    monkeypatch.setattr("eightgen.models.detector._reachable", lambda url, timeout: False)  # offline, on any machine
    monkeypatch.setenv("TORCH_HOME", places["torch-home"])
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code, out, err = _in_process(_argv("run", ["--preset", "seed"], places), capfd)
    assert_refused(code, out, err, "train.pretrained=true (resnet34)")
    assert "--no-pretrained" in err and str(Path(places["torch-home"]) / "hub" / "checkpoints") in err
    assert time.monotonic() - started < 20


# --- the terminal: real subprocesses ---------------------------------------------------------------------

SUBPROCESS_CASES = [
    ("run-unknown-preset", "run", ["--preset", "nope"], "unknown preset 'nope'"),
    ("run-corrupt-mnist", "run", ["--mnist-dir", "{truncated}"], "t10k-images-idx3-ubyte.gz"),
    ("report-damaged-manifest", "report", ["{damaged-manifest}"], "manifest.json"),
    ("serve-without-server", "serve", ["--cron", "0 3 * * *"], "serving needs a Prefect server"),
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EIGHTGEN_"))}
    return env | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", IDLE: "0"
    }


@pytest.mark.slow
@pytest.mark.parametrize(("command", "extra", "needle"), [c[1:] for c in SUBPROCESS_CASES], ids=[c[0] for c in SUBPROCESS_CASES])
def test_the_terminal_shows_one_line(command, extra, needle, places, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *_argv(command, extra, places)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )
    assert_refused(done.returncode, done.stdout, done.stderr, needle)


@pytest.mark.slow
def test_a_failed_task_shows_its_error_not_its_traceback(finished: Finished, failed: tuple[int, str, str]) -> None:
    """A task raising something other than EightgenError: Prefect's log lines without tracebacks, then one error line
    naming the log that holds them."""
    code, terminal, err = failed
    assert code == 2, terminal[-3000:] + err
    assert "Traceback" not in terminal + err, terminal[-3000:] + err
    assert all(PREFECT_LINE.match(line) for line in terminal.splitlines()), terminal[-3000:]
    assert "Task run failed with exception: InjectedFailure" in terminal, terminal[-3000:]
    (last,) = err.strip().splitlines()
    match = re.fullmatch(r"eightgen: error: InjectedFailure: EIGHTGEN_FAIL_ONCE=optimize-chunk: .* \(details: (.+)\)", last)
    assert match, last
    log = Path(match[1])
    assert log.parent == finished.cache / "logs" and log.name.startswith("eightgen-")
    text = log.read_text()
    assert text.startswith("eightgen run") and text.count("Traceback (most recent call last)") >= 2 and "tasks.faults.InjectedFailure" in text


# --- the error log --------------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_a_logged_traceback(finished: Finished, capfd, monkeypatch, tmp_path) -> None:
    """An OSError (here: a full disk while writing the report) is named in one line; its traceback goes to a log file."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "compare.html"))

    monkeypatch.setattr("reports.render.render_report", full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # `report` has no cache dir: its log goes to the temp dir
    code, out, err = _in_process(["report", str(finished.run), "-o", str(tmp_path / "compare.html")], capfd)
    assert code == 2 and "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    log = tmp_path / "eightgen-logs"
    (path,) = log.iterdir()
    assert line == f"eightgen: error: OSError: [Errno 28] No space left on device: '{tmp_path / 'compare.html'}' (details: {path})"
    text = path.read_text()
    assert text.startswith(f"eightgen report {finished.run}") and "Traceback (most recent call last)" in text and "in full" in text


def test_the_log_falls_back_to_the_temp_dir(places, capfd, monkeypatch, tmp_path) -> None:
    """A cache dir that cannot hold the log (here a file) sends it to <tmp>/eightgen-logs."""

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/somewhere")

    monkeypatch.setattr("runtime.preflight.preflight", denied)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code, out, err = _in_process(_argv("run", ["--cache-dir", "{a-file}/cache"], places), capfd)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("eightgen: error: PermissionError: [Errno 13] Permission denied: '/somewhere' (details: ")
    assert f"{tmp_path}/eightgen-logs/eightgen-" in line and "Traceback" not in out + err


def test_error_log_names_and_lines(monkeypatch, tmp_path) -> None:
    from datetime import datetime

    assert log_name(datetime(2024, 5, 6, 7, 8, 9), 42) == "eightgen-20240506-070809-42.log"
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "a-file" / "tmp"))
    log = ErrorLog(tmp_path / "a-file" / "cache", header="eightgen run")
    assert log.line("bad\ninput") == "eightgen: error: bad input"
    assert log.write("text") is None and log.lost
    cache, tmp = tmp_path / "a-file" / "cache" / "logs", tmp_path / "a-file" / "tmp" / "eightgen-logs"
    assert log.line("full") == f"eightgen: error: full (details not saved: {cache} and {tmp} not writable)"


def test_prefect_run_tracebacks_go_to_the_log_not_the_console(tmp_path) -> None:
    """The console shows a failed run's ERROR line without its traceback; the run logger's own (API) handler and the log keep it."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    console_text, api_text = io.StringIO(), io.StringIO()
    console, api = PrefectConsoleHandler(stream=console_text), logging.StreamHandler(api_text)
    root, runs = logging.getLogger(), logging.getLogger("prefect.task_runs")
    root.addHandler(console)
    runs.addHandler(api)
    log = ErrorLog(tmp_path, header="eightgen run")
    try:
        with log.prefect_tracebacks():
            local = {"send_to_api": False}  # no flow run here for Prefect's own API handler
            runs.info("Finished in state Completed()", extra=local)
            try:
                raise ValueError("boom")
            except ValueError:
                runs.error("Task run failed with exception: ValueError('boom')", exc_info=True, extra=local)
        assert not console.filters
    finally:
        root.removeHandler(console)
        runs.removeHandler(api)
    assert "Finished in state Completed()" in console_text.getvalue()
    assert "Task run failed with exception" in console_text.getvalue() and "Traceback" not in console_text.getvalue()
    assert "Traceback" in api_text.getvalue() and "ValueError: boom" in api_text.getvalue()
    assert log.path is not None and log.path.parent == tmp_path / "logs"
    assert "ValueError: boom" in log.path.read_text() and "Completed()" not in log.path.read_text()


# --- disk space -----------------------------------------------------------------------------------------


def test_disk_space_estimate_fails_below_and_warns_within_twice(tmp_path) -> None:
    from collections import namedtuple

    from eightgen.config import ExperimentConfig
    from eightgen.errors import EightgenError

    cfg = ExperimentConfig(cache_dir=tmp_path / "cache", runs_root=tmp_path / "runs")
    needs = space_needed([cfg])
    chunks = cfg.attack.seeds * 10 * 11 * 784 * 4  # 9 digits + noise, steps 0, 5, ..., 50
    assert [n[:2] for n in needs] == [("--cache-dir", tmp_path / "cache"), ("--runs-root", tmp_path / "runs")]
    assert needs[1][2] == chunks and needs[0][2] > chunks
    usage = namedtuple("usage", "total used free")
    total = needs[0][2] + needs[1][2]  # one filesystem holds both
    assert check_space(needs, lambda p: usage(0, 0, 3 * total)) == []
    (warning,) = check_space(needs, lambda p: usage(0, 0, int(1.5 * total)))
    assert warning.startswith("little disk space left for --cache-dir")
    with pytest.raises(EightgenError, match="not enough disk space for --cache-dir .* and --runs-root"):
        check_space(needs, lambda p: usage(0, 0, total - 1))
