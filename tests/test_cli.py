"""`eightgen run` on bad input: one line naming the problem, exit code 2, nothing written, before any training."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli.main import build_config, main, parser
from eightgen.attack.methods import step_size


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", *argv])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--arch", "vgg"], "train.arch"),
        (["--method", "sideways"], "attack.method"),
        (["--digits", "1,12"], "start digits must be 0-9"),
        (["--steps", "0"], "attack.steps"),
        (["--seeds", "-3"], "attack.seeds"),
        (["--method", "pgd_l2"], "needs eps"),
        (["--lr", "inf"], "attack.lr: Input should be a finite number"),
        (["--method", "pgd_l2", "--eps", "nan"], "attack.eps: Input should be a finite number"),
    ],
)
def test_bad_settings_fail_in_one_line(argv, needle, capsys, tmp_path: Path) -> None:
    code, out = _run([*argv, "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eightgen: error:") and needle in lines[0], out
    assert "Traceback" not in out
    assert not (tmp_path / "runs").exists()


def _copy_mnist(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.glob("t10k-*"):
        shutil.copy(f, dst / f.name)
    return dst


def test_corrupt_mnist_file_is_named(mnist_dir: Path, tmp_path: Path, capsys) -> None:
    bad = _copy_mnist(mnist_dir, tmp_path / "mnist")
    images = bad / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: 50_000])
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "results.csv").write_text("kept\n")
    code, out = _run(["--mnist-dir", str(bad), "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and "t10k-images-idx3-ubyte.gz" in out and "Traceback" not in out, out
    assert (earlier / "results.csv").read_text() == "kept\n"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["earlier"]


def test_missing_mnist_labels_are_named(mnist_dir: Path, tmp_path: Path, capsys) -> None:
    bad = _copy_mnist(mnist_dir, tmp_path / "mnist")
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    code, out = _run(["--mnist-dir", str(bad), "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "has no partner t10k-labels-idx1-ubyte[.gz]" in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()


def test_dataset_without_eights_is_refused(mnist_dir: Path, tmp_path: Path, capsys) -> None:
    bad = _copy_mnist(mnist_dir, tmp_path / "mnist")
    labels = bad / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    y = np.frombuffer(bytes(raw[8:]), dtype=np.uint8).copy()
    y[y == 8] = 3
    labels.write_bytes(gzip.compress(bytes(raw[:8]) + y.tobytes()))
    code, out = _run(["--mnist-dir", str(bad), "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    assert "no images of digit 8 in" in out, out


def test_env_mnist_dir_and_overrides_reach_the_config(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EIGHTGEN_MNIST_DIR", str(tmp_path))
    args = parser().parse_args(["run", "--preset", "quick", "--seeds", "3", "--digits", "2,7", "--lr", "0.5"])
    cfg = build_config(args)
    assert cfg.dataset.mnist_dir == tmp_path
    assert cfg.attack.seeds == 3 and cfg.attack.start_digits == (2, 7) and step_size(cfg.attack) == 0.5
    assert cfg.train.arch == "small_cnn"


@pytest.mark.parametrize("option", ["--runs-root", "--cache-dir"])
def test_a_folder_option_naming_a_file_fails_before_any_work(option: str, mnist_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = {"--runs-root": str(tmp_path / "runs"), "--cache-dir": str(tmp_path / "cache")} | {option: str(blocker / "below")}
    code, out = _run(["--mnist-dir", str(mnist_dir), *[x for kv in where.items() for x in kv]], capsys)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert lines[0] == f"eightgen: error: {option} {blocker / 'below'}: {blocker} is a file, not a folder; name a folder"
    assert blocker.read_text() == "not a folder" and not (tmp_path / "runs").exists()


SHARED = ["--dataset", "fashion_mnist", "--target", "3", "--source", "idx", "--data-dir", "/data/fashion", "--runs-root", "/r", "--cache-dir", "/c",
          "--run-name", "n", "--device", "cpu", "--digits", "all", "--starts-per-digit", "2", "--overwrite", "--force", "--lock-url", "redis://h:1/0"]


def test_every_command_takes_the_shared_options_and_applies_them_alike(monkeypatch) -> None:
    """run, serve, aligned and diffusion take one set of data, storage and device options and apply them the same way."""
    from cli.aligned import build_aligned_config
    from cli.diffusion import build_diffusion_config

    monkeypatch.delenv("EIGHTGEN_MNIST_DIR", raising=False)
    built = {}
    for command, build in [("run", build_config), ("serve", build_config), ("aligned", build_aligned_config), ("diffusion", build_diffusion_config)]:
        args = parser().parse_args([command, *SHARED])
        assert args.overwrite and args.force and args.lock_url == "redis://h:1/0", command
        cfg = build(args)
        aligned = getattr(cfg, "aligned", cfg)
        built[command] = cfg
        dataset, attack = aligned.dataset, aligned.attack
        assert (dataset.name, dataset.target, dataset.source, dataset.mnist_dir, dataset.hub_name) == (
            "fashion_mnist", 3, "idx", Path("/data/fashion"), None), command
        assert (attack.start_digits, attack.per_digit, attack.device) == (tuple(d for d in range(10) if d != 3), 2, "cpu"), command
        assert (aligned.runs_root, aligned.cache_dir, aligned.run_name) == (Path("/r"), Path("/c"), "n"), command
    aligned, diffusion = built["aligned"], built["diffusion"]
    assert {aligned.standard.device, aligned.robust.device, aligned.referees.device} == {"cpu"}
    assert (diffusion.device, diffusion.denoiser.device, diffusion.aligned.robust.device) == ("cpu", "cpu", "cpu")


def test_the_data_dir_falls_back_to_the_environment_for_every_command(monkeypatch) -> None:
    from cli.aligned import build_aligned_config
    from cli.diffusion import build_diffusion_config

    monkeypatch.setenv("EIGHTGEN_MNIST_DIR", "/env/mnist")
    for command, build in [("run", build_config), ("aligned", build_aligned_config), ("diffusion", build_diffusion_config)]:
        cfg = build(parser().parse_args([command]))
        assert getattr(cfg, "aligned", cfg).dataset.mnist_dir == Path("/env/mnist"), command
        cfg = build(parser().parse_args([command, "--local-path", "/hub/copy"]))
        assert getattr(cfg, "aligned", cfg).dataset.mnist_dir is None, command
