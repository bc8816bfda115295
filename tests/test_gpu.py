"""The GPU check stays runnable: the real command at its tiny size on the CPU, a misbehaving part reported while the
rest run, nothing it imports beyond what a bare CUDA machine has plus its wheels, and loops that never wait for the
device (host reads counted here, CUDA's own sync check where there is CUDA)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmarks.gpu import GOALS, PARTS, Goal
from benchmarks.gpu_nets import resnet_net
from benchmarks.gpu_parts import METHODS
from benchmarks.gpu_sync import HostReads, strict_steps
from eightgen.attack.optimize import compaction_steps, optimize
from eightgen.config import AttackConfig
from eightgen.diffusion.sampler import Guide, ddim_sample, make_schedule
from eightgen.diffusion.unet import UNet
from eightgen.models.detector import SmallCNN

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run python -m benchmarks.gpu at its tiny size; the process and its JSON report."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--size", "tiny", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return proc, json.loads(out.read_text())


def test_the_gpu_check_runs_every_part_at_its_tiny_size(tmp_path: Path) -> None:
    proc, report = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(report["parts"]) == list(PARTS)
    assert {n: p["status"] for n, p in report["parts"].items()} == {n: "ok" for n in PARTS}
    parts = {n: p["result"] for n, p in report["parts"].items()}
    agreement = parts["agreement"]
    assert agreement["passed"] and set(agreement["methods"]) == set(METHODS)
    assert all(m["within_tolerance"] and m["success_changed"] == 0.0 for m in agreement["methods"].values())
    assert agreement["train_step"]["within_tolerance"] and agreement["ddim"]["within_tolerance"]
    assert parts["syncs"]["passed"] and all(long <= short for name, (short, long) in parts["syncs"]["reads"].items() if "early-stop" not in name)
    for arch in ("small_cnn", "resnet18", "resnet34"):
        speed = parts[f"speed_{arch}"]
        assert speed["arch"] == arch and speed["best_rate"] > 0 and speed["flops_per_image_step"] > 0
        for row in speed["batches"].values():
            assert {"engine", "unrecorded", "bf16", "full_budget", "early_stop", "torchattacks"} <= set(row["rates"])
            assert row["roofline_fp32"] > 0 and row["vs_torchattacks"] > 0
    assert [(r["starts"], r["steps"]) for r in parts["scale"]["runs"]] == [(64, 10), (256, 5)]
    assert parts["denoiser"]["train_images_per_s"] > 0 and parts["denoiser"]["samples_per_s"] > 0
    assert [g["goal"] for g in report["goals"]] == [g.text for g in GOALS]
    if not torch.cuda.is_available():
        assert report["environment"]["device"] == "cpu"
        assert all(g["verdict"].startswith("not judged") for g in report["goals"])
    assert "[agreement] ok passed" in proc.stdout and "goals" in proc.stdout


def test_a_part_that_hangs_or_fails_is_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    # one part at a time, as on the GPU (the tiny run above runs them side by side)
    args = ("--jobs", "1", "--parts", "syncs,scale,denoiser", "--inject", "syncs=raise", "--inject", "scale=hang", "--limit", "scale=4")
    proc, report = gpu_check(tmp_path, *args)
    assert proc.returncode == 1
    parts = report["parts"]
    assert parts["syncs"]["status"] == "failed" and "injected failure in syncs" in parts["syncs"]["reason"]
    assert parts["scale"]["status"] == "timeout" and "limit of 4 s" in parts["scale"]["reason"]
    assert 4 <= parts["scale"]["seconds"] < 4 + 10
    assert parts["denoiser"]["status"] == "ok" and parts["denoiser"]["result"]["samples_per_s"] > 0
    assert "[scale] timeout" in proc.stdout and "[denoiser] ok" in proc.stdout


def test_unknown_parts_are_an_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--parts", "agreement,warp"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown parts warp" in proc.stderr


def test_the_check_loads_nothing_a_bare_cuda_machine_lacks_but_its_wheels() -> None:
    code = (
        "import sys, benchmarks.gpu, benchmarks.gpu_parts, eightgen.attack.optimize, eightgen.models.detector, "
        "eightgen.diffusion.unet, eightgen.diffusion.sampler;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastai', 'fastcore', 'prefect', 'datasets', 'foolbox'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_the_plain_torch_resnets_are_the_detectors_networks(arch: str) -> None:
    from eightgen.models.detector import build_network

    mine, theirs = resnet_net(arch), build_network(arch, 1)
    assert [(k, v.shape) for k, v in mine.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    mine.load_state_dict(theirs.state_dict())
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mine.eval()(x), theirs.eval()(x))


def test_the_goals_are_judged_only_on_a_full_cuda_run() -> None:
    parts = {"scale": {"result": {"runs": [{"starts": 1_000_000, "steps": 50, "seconds": 42.0}]}}}
    goal = next(g for g in GOALS if g.part == "scale")
    assert goal.measured(parts) == 42.0 and goal.verdict(42.0, True) == "met" and goal.verdict(61.0, True) == "missed"
    assert goal.verdict(42.0, False).startswith("not judged") and goal.verdict(None, True) == "not measured"
    assert Goal("x", ">= 1", "p", "k", at_least=1.0).verdict(0.5, True) == "missed"


# --- host reads --------------------------------------------------------------------------------------------


class Peeking(nn.Module):
    """A model that reads a value on the host at every call, as a loop must not."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        z.sum().item()
        return z


def reads(run, steps: int) -> int:
    """Host reads counted during run(steps)."""
    with HostReads() as counter:
        run(steps)
    return counter.total


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def x0() -> Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("extra", [dict(method="pgd_l2", eps=2.0), dict(method="min_l2"), dict(method="gd", early_stop=2), dict(method="min_l2", early_stop=3)])
def test_the_optimisation_loop_reads_nothing_on_the_host_per_step(net: nn.Module, x0: Tensor, extra: dict) -> None:
    run = lambda steps: optimize(net, x0, AttackConfig(steps=steps, record_every=5, **extra))  # noqa: E731
    short, long = reads(run, 32), reads(run, 128)
    # the chunk's results come to the host once; early stopping reads one count per compaction step (4 more of
    # them from 32 to 128 steps), never one per step
    extra = len(compaction_steps(128)) - len(compaction_steps(32)) if "early_stop" in extra else 0
    assert short <= 40 and long <= short + extra


def test_the_counter_sees_a_read_at_every_step(net: nn.Module, x0: Tensor) -> None:
    peeking = lambda steps: optimize(Peeking(net), x0, AttackConfig(method="pgd_l2", eps=2.0, steps=steps))  # noqa: E731
    assert reads(peeking, 128) == reads(peeking, 32) + 96


def test_early_stopping_compacts_at_a_fixed_few_steps(net: nn.Module, x0: Tensor) -> None:
    assert compaction_steps(32) == {1, 2, 3, 4, 6, 8, 12, 16, 23} and compaction_steps(1) == set()
    assert all(len(compaction_steps(s)) <= 2 * math.log2(s) + 1 for s in (2, 10, 32, 1000, 10**6))
    traj = optimize(net, x0, AttackConfig(method="gd", steps=40, early_stop=1))
    assert (traj.stopped_step >= 0).any()


def test_the_sampling_loop_reads_nothing_on_the_host_per_step(net: nn.Module) -> None:
    unet = UNet((4, 8, 8), 16).eval()
    schedule = make_schedule("cosine", 1000)
    noise = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    run = lambda steps: ddim_sample(unet, noise, 999, schedule, steps, guide=Guide(net, 6.0))  # noqa: E731
    assert reads(run, 128) == reads(run, 32)


@pytest.mark.cuda
def test_on_cuda_the_loops_run_their_steps_with_synchronisation_an_error(net: nn.Module, x0: Tensor) -> None:
    model, x = net.cuda().requires_grad_(False), x0.cuda()
    for extra in (dict(method="pgd_l2", eps=2.0), dict(method="min_l2", early_stop=2)):
        cfg = AttackConfig(steps=40, record_every=5, **extra)
        optimize(model, x, cfg)
        with strict_steps(40) as progress:
            optimize(model, x, cfg, progress)
    unet = UNet((4, 8, 8), 16).eval().cuda()
    noise = torch.randn(3, 1, 28, 28, device="cuda")
    with strict_steps(10) as progress:
        ddim_sample(unet, noise, 999, make_schedule("cosine", 1000), 10, guide=Guide(model, 6.0), progress=progress)
    with pytest.raises(RuntimeError), strict_steps(10) as progress:  # the check itself: a sync inside is an error
        progress(1)
        torch.ones(1, device="cuda").item()
