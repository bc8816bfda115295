"""The GPU check's parts, each run alone by benchmarks.gpu in a process of its own (so a hang or crash stays there).

    python -m benchmarks.gpu_parts PART --size tiny|full --device auto --limit SECONDS --out FILE [--mnist-dir DIR]

A part writes {"result": {...}} to FILE, after each finished stage too (a part stopped at its limit keeps what
it had); a result's "table" holds the lines the check prints, the rest its figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import model_flops_per_image_step, round_seconds, timed, torchattacks_pgd
from benchmarks.gpu_nets import Digits, cycled, detector, load_digits, pool, starts, train_step, trained
from benchmarks.gpu_sync import HostReads, strict_steps
from benchmarks.tolerance import compare
from eightgen.attack.optimize import compaction_steps, final_images, optimize
from eightgen.config import AttackConfig, DenoiserConfig
from eightgen.diffusion.sampler import Guide, ddim_sample, ddpm_loss, make_schedule
from eightgen.diffusion.unet import UNet
from eightgen.trajectory import Trajectory

INJECT_ENV = "EIGHTGEN_GPU_INJECT"  # "part=hang,other=raise": make parts misbehave, to check that the rest still runs
GUIDANCE = 6.0  # DiffusionConfig's default guidance scale
PGD = dict(method="pgd_l2", eps=2.0, lr=0.25)  # the PGD that the engine and torchattacks both run (benchmarks.bench)
METHODS = {"seed": {}, "gd": {}, "pgd_linf": {"eps": 0.1}, "pgd_l2": {"eps": 2.0}, "min_l2": {}}
# CUDA against the CPU on the same starts and weights (float32, TF32 off); trajectories that meet a near-tie
# (a gradient sign, a ReLU at zero) part, so the per-start figures are shares and medians.
TOLERANCE = {
    "success_changed": 0.02,  # share of starts that flip on one device only
    "flip_step_changed": 0.05,  # share of starts flipped on both whose flip step differs
    "p_target_median_diff": 1e-3,  # median |p_cuda - p_cpu| of the final images
    "l2_median_rel_diff": 1e-3,  # median |L2_cuda - L2_cpu| / L2_cpu of x_final - x0
    "train_grad_rel_diff": 1e-4,  # ||g_cuda - g_cpu|| / ||g_cpu|| of one training step's weight gradient
    "ddim_max_diff": 1e-3,  # max |x_cuda - x_cpu| of a guided DDIM run's images
}


@dataclass(frozen=True)
class Size:
    """How much each part does."""

    agree_n: int
    agree_steps: int
    train_steps: int  # the detectors' training (8 vs not 8) before they are measured
    train_batch: int
    speed_batches: tuple[int, ...]
    speed_steps: int
    rounds: int
    matmul: int
    scale_runs: tuple[tuple[int, int], ...]  # (starts, steps)
    scale_chunk: int
    unet_batch: int
    unet_steps: int
    sample_batch: int
    sample_steps: int
    sync_n: int
    sync_steps: int  # the loops run this many steps, then four times as many
    compile: bool = False


SIZES = {
    "tiny": Size(8, 5, 3, 16, (8,), 3, 1, 128, ((64, 10), (256, 5)), 128, 8, 2, 4, 2, 4, 32),
    "full": Size(
        512, 50, 200, 256, (8192, 65536), 10, 3, 8192, ((100_000, 100), (1_000_000, 50)), 65_536,
        512, 30, 4096, 20, 4096, 40, compile=True,
    ),  # fmt: skip
}


@dataclass
class Ctx:
    """What a part runs with, and where it keeps its result."""

    name: str
    size: Size
    device: torch.device
    digits: Digits
    limit: float
    out: Path
    started: float = field(default_factory=time.perf_counter)
    result: dict = field(default_factory=lambda: {"table": []})

    def left(self) -> float:
        """Seconds left before the part's limit."""
        return self.limit - (time.perf_counter() - self.started)

    def save(self, **figures: object) -> None:
        """Add figures to the result and write it out."""
        self.result.update(figures)
        self.out.write_text(json.dumps({"result": self.result}, default=_plain))

    def line(self, text: str) -> None:
        """Add a line to the printed table."""
        self.result["table"].append(text)
        self.save()


def _plain(value: object) -> object:
    """JSON for numpy scalars."""
    return value.item() if isinstance(value, np.generic) else str(value)


def _rate(work: float, seconds: np.ndarray) -> float:
    return float(work / np.median(seconds))


def _g(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


# --- agreement: the same work on the device and on the CPU ---------------------------------------------------


def _finals(traj: Trajectory, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p(target) and L2 of x_final - x0 per start."""
    l2 = np.sqrt(((traj.x_final - x0).astype(np.float64) ** 2).reshape(len(x0), -1).sum(axis=1))
    return traj.p_target[:, -1].astype(np.float64), l2


def method_agreement(a: Trajectory, b: Trajectory, x0: np.ndarray) -> dict:
    """How far run b (device) is from run a (CPU) on the same starts, and whether within TOLERANCE."""
    (pa, la), (pb, lb) = _finals(a, x0), _finals(b, x0)
    row = {
        **compare(a, b),
        "p_target_median_diff": float(np.median(np.abs(pa - pb))),
        "p_target_max_diff": float(np.max(np.abs(pa - pb))),
        "l2_median_rel_diff": float(np.median(np.abs(la - lb) / np.maximum(la, 1e-12))),
    }
    keys = ("success_changed", "flip_step_changed", "p_target_median_diff", "l2_median_rel_diff")
    return {**row, "within_tolerance": all(row[k] <= TOLERANCE[k] for k in keys)}


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double().cpu() for p in model.parameters() if p.grad is not None])


def train_agreement(ctx: Ctx) -> dict:
    """One training step of the small CNN from the same weights on the same batch, on the CPU and on the device."""
    xb = starts(ctx.digits, 64, torch.device("cpu"))
    yb = torch.arange(64) % 2
    losses, grads = [], []
    for d in (torch.device("cpu"), ctx.device):
        model = detector("small_cnn").to(d)
        losses.append(float(train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), xb.to(d), yb.to(d))))
        grads.append(_grads(model))
    (ga, gb), (la, lb) = grads, losses
    rel = float((ga - gb).norm() / ga.norm().clamp_min(1e-30))
    return {"loss_rel_diff": abs(la - lb) / max(abs(la), 1e-30), "grad_rel_diff": rel, "within_tolerance": rel <= TOLERANCE["train_grad_rel_diff"]}


def _unet(seed: int = 0) -> UNet:
    """The denoiser at its default size, random weights (its zero-initialised output layer too)."""
    cfg = DenoiserConfig()
    torch.manual_seed(seed)
    net = UNet(tuple(cfg.widths), cfg.emb_dim)
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)
    return net.eval().requires_grad_(False)


def ddim_agreement(ctx: Ctx, det: torch.nn.Module) -> dict:
    """A guided DDIM run of two steps from pure noise, on the CPU and on the device."""
    cfg = DenoiserConfig()
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    x_t = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    finals = []
    for d in (torch.device("cpu"), ctx.device):
        guide = Guide(copy.deepcopy(det).to(d), GUIDANCE)
        finals.append(ddim_sample(_unet().to(d), x_t.to(d), cfg.timesteps - 1, schedule, 2, guide=guide).x_final)
    diff = float((finals[0] - finals[1]).abs().max())
    return {"max_diff": diff, "within_tolerance": diff <= TOLERANCE["ddim_max_diff"]}


def agreement(ctx: Ctx) -> None:
    """Every method, a training step and a guided DDIM run: the device against the CPU."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    size, cpu = ctx.size, torch.device("cpu")
    model = trained("small_cnn", ctx.digits, size.train_steps, size.train_batch, ctx.device)
    on_cpu = copy.deepcopy(model).to(cpu)
    x0 = starts(ctx.digits, size.agree_n, ctx.device)
    methods = {}
    for method, extra in METHODS.items():
        cfg = AttackConfig(method=method, steps=size.agree_steps, record_every=5, **extra)
        methods[method] = method_agreement(optimize(on_cpu, x0.cpu(), cfg), optimize(model, x0, cfg), x0.cpu().numpy())
        m = methods[method]
        ctx.line(
            f"{method}: success changed {m['success_changed']:.3f}, flip steps changed {m['flip_step_changed']:.3f}, "
            f"median |dp| {m['p_target_median_diff']:.2g}, median L2 rel. diff {m['l2_median_rel_diff']:.2g}"
            f" -> {'within' if m['within_tolerance'] else 'OUTSIDE'} tolerance"
        )
        ctx.save(methods=methods)
    train, ddim = train_agreement(ctx), ddim_agreement(ctx, on_cpu)
    ctx.line(f"training step: gradient rel. diff {train['grad_rel_diff']:.2g} -> {'within' if train['within_tolerance'] else 'OUTSIDE'}")
    ctx.line(f"guided DDIM (2 steps): max |dx| {ddim['max_diff']:.2g} -> {'within' if ddim['within_tolerance'] else 'OUTSIDE'}")
    passed = all(m["within_tolerance"] for m in methods.values()) and train["within_tolerance"] and ddim["within_tolerance"]
    ctx.save(n=size.agree_n, steps=size.agree_steps, tolerance=TOLERANCE, train_step=train, ddim=ddim, passed=passed)


# --- host waits --------------------------------------------------------------------------------------------


def syncs(ctx: Ctx) -> None:
    """Host reads of the loops do not grow with their steps; on CUDA their steps run with syncs made errors."""
    size, dev = ctx.size, ctx.device
    model = detector("small_cnn").to(dev).eval().requires_grad_(False)
    x0 = starts(ctx.digits, size.sync_n, dev)
    unet, guide = UNet((4, 8, 8), 16).eval().requires_grad_(False).to(dev), Guide(model, GUIDANCE)  # any size will do
    schedule = make_schedule("cosine", 1000)
    noise = torch.randn(size.sync_n, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dev)
    attacks = {"pgd_l2": dict(PGD), "gd early-stop": dict(method="gd", early_stop=2), "min_l2 early-stop": dict(method="min_l2", early_stop=2)}
    runs: dict[str, Callable[..., object]] = {
        name: lambda s, p=None, c=c: optimize(model, x0, AttackConfig(steps=s, **c), p) for name, c in attacks.items()
    } | {"ddim guided": lambda s, p=None: ddim_sample(unet, noise, 999, schedule, s, guide=guide, progress=p)}
    reads, strict = {}, {}
    for name, run in runs.items():
        counts = []
        for steps in (size.sync_steps, 4 * size.sync_steps):
            with HostReads() as counter:
                run(steps)
            counts.append(counter.total)
        reads[name] = counts
        if dev.type == "cuda":
            run(size.sync_steps)  # warm: plans and kernels chosen before the strict run
            with strict_steps(size.sync_steps) as progress:
                run(size.sync_steps, progress)
            strict[name] = "no sync"
        ctx.line(f"{name}: host reads {counts[0]} ({size.sync_steps} steps), {counts[1]} ({4 * size.sync_steps} steps)"
                 + (f"; CUDA sync check: {strict[name]}" if strict else ""))  # fmt: skip
    # early stopping reads one count per compaction step: the longer run has a few more of them, never one per step
    more = len(compaction_steps(4 * size.sync_steps)) - len(compaction_steps(size.sync_steps))
    allowed = {name: more if "early-stop" in name else 0 for name in reads}
    ctx.save(reads=reads, strict=strict or None, passed=all(b <= a + allowed[name] for name, (a, b) in reads.items()))


# --- engine speed ------------------------------------------------------------------------------------------


def matmul_rates(n: int, device: torch.device, rounds: int) -> dict[str, float]:
    """FLOP/s of an n x n x n matrix product in float32 (torch's default precision) and in bfloat16."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds = round_seconds({name: lambda: [torch.mm(a, b) for _ in range(5)]}, max(rounds, 2), device)[name]
        rates[name] = _rate(5 * 2 * n**3, seconds)
    return rates


def speed(ctx: Ctx, arch: str) -> None:
    """Image-steps/s of the engine on arch at each batch size, beside torchattacks' PGD and a matmul's rate."""
    size, dev = ctx.size, ctx.device
    model = trained(arch, ctx.digits, size.train_steps, size.train_batch, dev)
    base = pool(ctx.digits, dev)
    flops = model_flops_per_image_step(model, base[:8])
    mm = matmul_rates(size.matmul, dev, size.rounds)
    ctx.save(arch=arch, flops_per_image_step=flops, matmul_flops_per_s=mm, batches={})
    steps = size.speed_steps
    pgd, gd = dict(steps=steps, record_every=5, **PGD), dict(method="gd", loss="ce", steps=steps, record_every=5)
    variants = {
        "engine": lambda x: optimize(model, x, AttackConfig(**pgd)),
        "unrecorded": lambda x: final_images(model, x, AttackConfig(**pgd)),
        "bf16": lambda x: optimize(model, x, AttackConfig(**pgd, autocast_bf16=True)),
        "full_budget": lambda x: optimize(model, x, AttackConfig(**gd)),
        "early_stop": lambda x: optimize(model, x, AttackConfig(**gd, early_stop=1)),
    }
    try:
        import torchattacks  # noqa: F401

        variants["torchattacks"] = lambda x: torchattacks_pgd(model, x, steps)
    except ImportError:
        ctx.line("torchattacks is not installed: no comparison")
    for n in size.speed_batches:
        x0 = cycled(base, 0, n)
        seconds = round_seconds({k: (lambda f=f: f(x0)) for k, f in variants.items()}, size.rounds, dev)
        rate = {k: _rate(n * steps, s) for k, s in seconds.items()}
        if size.compile and dev.type == "cuda" and n == max(size.speed_batches) and ctx.left() > 0.5 * ctx.limit:
            compiled = AttackConfig(**pgd, compile=True, autocast_bf16=True)
            try:
                rate["bf16_compile"] = _rate(n * steps, round_seconds({"c": lambda: optimize(model, x0, compiled)}, size.rounds, dev)["c"])
            except Exception as exc:  # a compiler failure costs this figure only
                ctx.line(f"{arch} batch {n}: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]})")
        row = {
            "rates": rate,
            "vs_torchattacks": rate["engine"] / rate["torchattacks"] if "torchattacks" in rate else None,
            "recording_overhead": rate["unrecorded"] / rate["engine"] - 1.0,
            "early_stop_gain": rate["early_stop"] / rate["full_budget"],
            "roofline_fp32": rate["engine"] * flops / mm["fp32"],
            "roofline_bf16": max(rate["bf16"], rate.get("bf16_compile", 0.0)) * flops / mm["bf16"],
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        }
        ctx.result["batches"][str(n)] = row
        ctx.line(
            f"{arch} batch {n}: engine {_g(rate['engine'])} image-steps/s (unrecorded {_g(rate['unrecorded'])}, bf16 "
            f"{_g(rate['bf16'])}, bf16+compile {_g(rate.get('bf16_compile'))}), x torchattacks {_g(row['vs_torchattacks'])}, "
            f"early stop x{_g(row['early_stop_gain'])}, roofline {row['roofline_fp32']:.1%} of fp32 / "
            f"{row['roofline_bf16']:.1%} of bf16 matmul"
        )
    best = max(max(r["rates"][k] for k in ("engine", "bf16", "bf16_compile") if k in r["rates"]) for r in ctx.result["batches"].values())
    ctx.save(steps=steps, best_rate=best, best_roofline_bf16=max(r["roofline_bf16"] for r in ctx.result["batches"].values()))


# --- scale, the denoiser -----------------------------------------------------------------------------------


def scale(ctx: Ctx) -> None:
    """Many starts through the quick detector (small CNN, seed method, recorded) in chunks: seconds and peak memory."""
    size, dev = ctx.size, ctx.device
    model = trained("small_cnn", ctx.digits, size.train_steps, size.train_batch, dev)
    base = pool(ctx.digits, dev)
    optimize(model, base[:8], AttackConfig(steps=2))  # the plan and the kernels, before the clock starts
    runs, rate = [], None
    for n, steps in size.scale_runs:
        if rate is not None and 1.5 * n * steps / rate > ctx.left():
            ctx.line(f"{n} starts x {steps} steps: skipped (about {n * steps / rate:.0f} s, {ctx.left():.0f} s left)")
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        cfg, flipped = AttackConfig(steps=steps, record_every=5), 0

        def run() -> None:
            nonlocal flipped
            for lo in range(0, n, size.scale_chunk):
                flipped += int((optimize(model, cycled(base, lo, min(n, lo + size.scale_chunk)), cfg).flip_step >= 0).sum())

        seconds = timed(run, dev)
        rate = n * steps / seconds
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        runs.append({"starts": n, "steps": steps, "seconds": seconds, "rate": rate, "flipped": flipped / n, "peak_memory_bytes": peak})
        ctx.line(f"{n} starts x {steps} steps: {seconds:.1f} s, {_g(rate)} image-steps/s, {flipped / n:.1%} flipped, "
                 f"peak GPU memory {'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'}")  # fmt: skip
        ctx.save(runs=runs, chunk=size.scale_chunk)


def denoiser(ctx: Ctx) -> None:
    """The U-Net's training images/s on the DDPM objective, and guided DDIM samples/s."""
    size, dev, cfg = ctx.size, ctx.device, DenoiserConfig()
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    unet = _unet().to(dev).train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    x = starts(ctx.digits, size.unet_batch, dev)

    def train(k: int) -> None:
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            ddpm_loss(unet, x, schedule).backward()
            opt.step()

    train(2)
    seconds = timed(lambda: train(size.unet_steps), dev)
    images = size.unet_batch * size.unet_steps / seconds
    ctx.line(f"training: {_g(images)} images/s (batch {size.unet_batch}, widths {tuple(cfg.widths)})")
    guide = Guide(trained("small_cnn", ctx.digits, size.train_steps, size.train_batch, dev), GUIDANCE)
    unet.eval().requires_grad_(False)
    noise = torch.randn(size.sample_batch, 1, 28, 28, device=dev)
    sample = lambda k: ddim_sample(unet, noise, cfg.timesteps - 1, schedule, k, guide=guide)  # noqa: E731
    sample(1)
    seconds = timed(lambda: sample(size.sample_steps), dev)
    samples = size.sample_batch / seconds
    ctx.line(f"guided DDIM, {size.sample_steps} steps: {_g(samples)} samples/s (batch {size.sample_batch})")
    ctx.save(train_images_per_s=images, samples_per_s=samples, sample_steps=size.sample_steps)


PARTS: dict[str, Callable[[Ctx], None]] = {
    "agreement": agreement,
    "syncs": syncs,
    **{f"speed_{arch}": (lambda ctx, arch=arch: speed(ctx, arch)) for arch in ("small_cnn", "resnet18", "resnet34")},
    "scale": scale,
    "denoiser": denoiser,
}


def injected(part: str) -> str | None:
    """The misbehaviour asked of this part in $EIGHTGEN_GPU_INJECT (hang or raise), if any."""
    pairs = dict(item.split("=", 1) for item in os.environ.get(INJECT_ENV, "").split(",") if "=" in item)
    return pairs.get(part)


def main(argv: list[str] | None = None) -> int:
    """Run one part; its result goes to --out."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_parts")
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--size", choices=list(SIZES), required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mnist-dir", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if args.size == "tiny":
        torch.set_num_threads(1)  # tiny batches gain nothing from more, and the CPUs may be shared
    ctx = Ctx(args.part, SIZES[args.size], device, load_digits(args.mnist_dir), args.limit, args.out)
    ctx.save(data=ctx.digits.source)
    what = injected(args.part)
    if what == "hang":
        time.sleep(10 * args.limit)
    elif what == "raise":
        raise RuntimeError(f"injected failure in {args.part}")
    PARTS[args.part](ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
