"""Engine benchmark: image-steps/s of the engine vs the seed loop and torchattacks, roofline, min_l2 quality.

Every figure is measured in one process on one trained detector, one batch of real non-8 pool images and
one device, with the same torch thread count. The timed contenders run in rounds: each runs once per round,
those compared with each other back to back, and every other round in reverse order (ABBA) to cancel drift.
Each ratio is taken per round from that round's timings; the figure is the median over the rounds, with its
spread (interquartile range / median), its range and a flag, false when the spread is over 0.3 or the rounds
fewer than 5. Rates are the medians of the rounds' rates. On a machine with more runnable threads than CPUs,
--threads 1 keeps torch's threads from waiting for each other.

    python -m benchmarks.bench [--arch small_cnn|resnet18|resnet34] [--n 256] [--steps 20] [--device auto]
                             [--threads N] [--repeats 9] [--mnist-dir DIR | --model-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eightgen.artifacts import read_manifest, sha256_json
from eightgen.attack.losses import per_sample_loss
from eightgen.attack.optimize import TARGET, execution_model, final_images, frozen_eval, optimize
from eightgen.config import AttackConfig, DatasetConfig, TrainConfig
from eightgen.data.assembly import assemble, load_assembled, save_assembled
from eightgen.data.sources import load_mnist
from eightgen.devices import pick_device
from eightgen.errors import EightgenError
from eightgen.models.detector import PixelClassifier, load_classifier, to_model_input

POOL_PER_DIGIT = 64
NOT_TARGET = (0, 1, 2, 3, 4, 5, 6, 7, 9)
PGD_EPS, PGD_ALPHA = 2.0, 0.25  # L2 budget and step of the PGD the engine and torchattacks both run
RECORD_EVERY = 5
MATMUL_REPS = 10  # products per timed matmul round: about a second, like the model contenders, not a lucky instant
# A ratio is trusted when the middle half of its per-round values spans at most 30% of their median (with 9
# rounds the median's own standard error is then about 9%), over at least 5 rounds.
TRUST_SPREAD = 0.3
TRUST_ROUNDS = 5
HEADLINE = ("speedup_vs_seed_loop", "ratio_vs_torchattacks", "recording_overhead", "early_stop_gain", "roofline")
# The round's running order: contenders whose timings are divided by each other stand next to each other.
ROUND = ("engine_pgd", "torchattacks_pgd", "seed_loop", "engine", "engine_unrecorded", "matmul", "full_budget", "early_stop")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures, and how long it takes."""

    arch: str = "small_cnn"
    n: int = 256
    steps: int = 20
    device: str = "auto"
    threads: int | None = None
    repeats: int = 9
    seed_loop_n: int = 16
    quality_steps: int = 100
    matmul_size: int = 2048
    epochs: int = 2


QUICK = dict(n=8, steps=3, repeats=3, seed_loop_n=2, quality_steps=5, matmul_size=256)


# --- the detector and the starts ---------------------------------------------------------------------------


def default_mnist_dir() -> Path | None:
    """$EIGHTGEN_MNIST_DIR, else the shared MNIST folder next to the repository if it is there."""
    env = os.environ.get("EIGHTGEN_MNIST_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
    return beside if beside.is_dir() else None


def dataset_config(mnist_dir: Path) -> DatasetConfig:
    """The benchmark's dataset: every local MNIST image, 64 pool images per digit held out for starts."""
    return DatasetConfig(source="idx", mnist_dir=mnist_dir, pool_per_digit=POOL_PER_DIGIT, seed=0)


def _complete(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except EightgenError:
        return False
    return True


def prepared_model(arch: str, mnist_dir: Path, cache_dir: Path, epochs: int = 2) -> tuple[Path, Path]:
    """Dataset and trained-model directories for arch under cache_dir, built on first use and reused after."""
    from eightgen.models.training import train  # fastai: only when a model is trained (benchmarks.gpu runs without it)

    dcfg = dataset_config(mnist_dir)
    tcfg = TrainConfig(arch=arch, epochs=epochs, device="cpu", seed=0)
    dataset_dir = cache_dir / f"dataset-{sha256_json(dcfg.model_dump(mode='json', exclude={'mnist_dir'}))[:10]}"
    if not _complete(dataset_dir):
        save_assembled(assemble(load_mnist(dcfg), dcfg), dataset_dir)
    model_dir = cache_dir / f"model-{arch}-{sha256_json([tcfg.model_dump(mode='json'), dataset_dir.name])[:10]}"
    if not _complete(model_dir):
        train(tcfg, dataset_dir, model_dir)
    return dataset_dir, model_dir


def model_for(args: argparse.Namespace, arch: str, epochs: int = 2) -> tuple[Path, Path]:
    """(model, dataset) directories from --model-dir, else trained on --mnist-dir (or the shared MNIST) and cached."""
    if args.model_dir is not None:
        return args.model_dir, dataset_of(args.model_dir)
    mnist_dir = args.mnist_dir or default_mnist_dir()
    if mnist_dir is None:
        raise EightgenError("no MNIST files: give --mnist-dir DIR (or set EIGHTGEN_MNIST_DIR) or --model-dir")
    dataset_dir, model_dir = prepared_model(arch, mnist_dir, args.cache_dir, epochs)
    return model_dir, dataset_dir


def dataset_of(model_dir: Path) -> Path:
    """The dataset directory a model directory's manifest says it was trained on."""
    path = read_manifest(model_dir).get("dataset", {}).get("path")
    if not path or not Path(path).is_dir():
        raise EightgenError(f"{model_dir}: its manifest names no dataset directory that exists (got {path!r})")
    return Path(path)


def bench_starts(dataset_dir: Path, n: int, channels: int) -> Tensor:
    """n real non-8 pool images (never trained on), digits taken in turn: 0, 1, ..., 9 (no 8), 0, 1, ..."""
    data = load_assembled(dataset_dir)
    by_digit = [np.flatnonzero(data.y_pool == d) for d in NOT_TARGET if d != data.target]
    order = [idx[i] for i in range(max(map(len, by_digit))) for idx in by_digit if i < len(idx)]
    if n > len(order):
        raise EightgenError(f"--n {n}: the pool of {dataset_dir} holds only {len(order)} non-{data.target} images")
    return to_model_input(np.asarray(data.x_pool)[order[:n]], channels)


# --- the contenders ----------------------------------------------------------------------------------------


def seed_loop(model: PixelClassifier, x0: Tensor, steps: int, lr: float = 1.0) -> Tensor:
    """The notebook's iterate_image, one image at a time, its loss and p(8) read every step; final pixels.

    As in the notebook: the raw network on the normalised image, softmax, l1_loss against the one-hot
    target, backward, image.data -= lr * image.grad, image.grad.zero_(). (The notebook's network also
    computed weight gradients; here they are frozen, which only makes this loop faster.)
    """
    net, mean, std = model.net, model.mean[0], model.std[0]
    target = F.one_hot(torch.tensor([TARGET], device=x0.device), 2).float()
    out, snapshots = [], []
    for start in x0:
        image = ((start - mean) / std).clone().requires_grad_(True)
        for i in range(steps):
            preds = F.softmax(net(image[None]), dim=1)
            loss = F.l1_loss(preds, target)
            loss.backward()
            image.data -= lr * image.grad
            image.grad.zero_()
            record = (preds.detach()[0, TARGET].item(), loss.detach().item())  # what the notebook printed
            if i % RECORD_EVERY == 0:
                snapshots.append((record, image.detach().clone()))
        out.append(image.detach() * std + mean)
    return torch.stack(out)


def torchattacks_pgd(model: nn.Module, x0: Tensor, steps: int) -> Tensor:
    """torchattacks' PGD-L2 toward class 1 (targeted, no random start): the engine's pgd_l2 with the same budget."""
    import torchattacks

    # torchattacks adds 1e-10 to gradient norms of its averaged loss: a confident start's gradient / 256 is of
    # that order, and its steps come out shorter than alpha. 1e-30 keeps only the guard against zero.
    attack = torchattacks.PGDL2(model, eps=PGD_EPS, alpha=PGD_ALPHA, steps=steps, random_start=False, eps_for_division=1e-30)
    attack.set_mode_targeted_by_label(quiet=True)
    return attack(x0, torch.full((len(x0),), TARGET, dtype=torch.long, device=x0.device))


def engine_config(method: str, steps: int, **extra) -> AttackConfig:
    """The attack config of one engine contender."""
    if method == "pgd_l2":
        extra = dict(eps=PGD_EPS, lr=PGD_ALPHA, **extra)
    return AttackConfig(method=method, steps=steps, record_every=RECORD_EVERY, **extra)


def model_flops_per_image_step(model: nn.Module, x0: Tensor) -> float:
    """FLOPs of one forward and one backward to the input per image, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    x = x0[: min(len(x0), 8)].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        # .backward(inputs=...) rather than autograd.grad, which FlopCounterMode's module hooks reject.
        per_sample_loss("l1_softmax", model(x)).sum().backward(inputs=[x])
    return counter.get_total_flops() / len(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of fn, the device's queued work finished before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def round_seconds(contenders: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, np.ndarray]:
    """Each contender's seconds in each of `rounds` rounds (after one warm-up); odd rounds run in reverse order."""
    for fn in contenders.values():
        fn()
    seconds = {name: np.empty(rounds) for name in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            seconds[name][r] = timed(contenders[name], device)
    return seconds


@dataclass(frozen=True)
class PairedRatio:
    """The median over rounds of scale * numerator / denominator, taken round by round, and its spread."""

    median: float
    spread: float  # interquartile range / median
    low: float
    high: float
    rounds: int

    @property
    def trusted(self) -> bool:
        """Whether enough rounds agree closely enough for the median to be reported as a figure."""
        return self.rounds >= TRUST_ROUNDS and self.spread <= TRUST_SPREAD


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, scale: float = 1.0) -> PairedRatio:
    """Median and spread of the per-round ratios scale * numerator[i] / denominator[i]."""
    ratios = scale * np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    q1, median, q3 = np.quantile(ratios, [0.25, 0.5, 0.75])
    return PairedRatio(float(median), float((q3 - q1) / median), float(ratios.min()), float(ratios.max()), len(ratios))


def ratio_fields(name: str, ratio: PairedRatio, shift: float = 0.0) -> dict[str, object]:
    """name: the median (plus shift), with its _spread, _range [min, max] (plus shift) and _trusted."""
    return {
        name: ratio.median + shift,
        f"{name}_spread": ratio.spread,
        f"{name}_range": [ratio.low + shift, ratio.high + shift],
        f"{name}_trusted": ratio.trusted,
    }


def _agree(a: Tensor, b: Tensor, atol: float = 1e-4) -> float:
    """The share of images in a and b whose pixels all agree within atol."""
    return float(((a - b).flatten(1).abs().amax(dim=1) <= atol).float().mean())


def _classes(model: nn.Module, x: Tensor) -> Tensor:
    """The class the model gives each image."""
    with torch.no_grad():
        return model(x).argmax(dim=1)


# --- min_l2 quality ----------------------------------------------------------------------------------------


def perturbation_quality(model: nn.Module, x0: Tensor, adv: Tensor) -> tuple[float, float]:
    """(median L2 of adv - x0 with failures counted as infinite, success rate): success = the model says 8."""
    with torch.no_grad():
        success = model(adv).argmax(dim=1) == TARGET
    l2 = (adv - x0).flatten(1).norm(dim=1)
    l2 = torch.where(success, l2, torch.full_like(l2, math.inf))
    return float(l2.median()), float(success.float().mean())


def reference_attacks(model: nn.Module, x0: Tensor, steps: int) -> dict[str, Tensor]:
    """Minimal-L2 perturbations toward class 1 by foolbox's FMN and DDN (torchattacks' CW if foolbox is missing)."""
    target = torch.full((len(x0),), TARGET, dtype=torch.long, device=x0.device)
    try:
        import foolbox
    except ImportError:
        import torchattacks

        cw = torchattacks.CW(model, c=1.0, kappa=0.0, steps=steps, lr=0.01)
        cw.set_mode_targeted_by_label(quiet=True)
        return {"cw": cw(x0, target)}
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x0.device)
    criterion = foolbox.criteria.TargetedMisclassification(target)
    attacks = {"fmn": foolbox.attacks.L2FMNAttack(steps=steps), "ddn": foolbox.attacks.DDNAttack(steps=steps)}
    return {name: attack(fmodel, x0, criterion, epsilons=None)[1] for name, attack in attacks.items()}


# --- the run -----------------------------------------------------------------------------------------------


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS, so that each step does not fault its activations in anew."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's ceiling for the mmap threshold; the trim threshold may be anything.
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def run_bench(cfg: BenchConfig, model_dir: Path, dataset_dir: Path) -> dict:
    """Every benchmark figure as one flat dict (rates in image-steps/s, ratios the medians of per-round ratios)."""
    device = pick_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, spec = load_classifier(model_dir, device)
    x0 = bench_starts(dataset_dir, cfg.n, spec.channels).to(device)
    loop_x0 = x0[: min(cfg.seed_loop_n, cfg.n)]
    n, steps = cfg.n, cfg.steps
    seed_cfg, pgd_cfg = engine_config("seed", steps), engine_config("pgd_l2", steps)
    full_cfg = engine_config("gd", steps, loss="ce")
    early_cfg = engine_config("gd", steps, loss="ce", early_stop=1)
    a = torch.randn(cfg.matmul_size, cfg.matmul_size, device=device)
    b = torch.randn(cfg.matmul_size, cfg.matmul_size, device=device)
    runs: dict[str, object] = {}

    def keep(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: runs.__setitem__(name, fn())

    contenders = {
        "matmul": lambda: [torch.mm(a, b) for _ in range(MATMUL_REPS)],
        "engine": keep("engine", lambda: optimize(model, x0, seed_cfg)),
        "engine_unrecorded": keep("engine_unrecorded", lambda: final_images(model, x0, seed_cfg)),
        "seed_loop": keep("seed_loop", lambda: seed_loop(model, loop_x0, steps)),
        "engine_pgd": keep("engine_pgd", lambda: optimize(model, x0, pgd_cfg)),
        "torchattacks_pgd": keep("torchattacks_pgd", lambda: torchattacks_pgd(model, x0, steps)),
        "full_budget": keep("full_budget", lambda: optimize(model, x0, full_cfg)),
        "early_stop": keep("early_stop", lambda: optimize(model, x0, early_cfg)),
    }
    seconds = round_seconds({name: contenders[name] for name in ROUND}, cfg.repeats, device)
    work = {name: n * steps for name in ROUND} | {"seed_loop": len(loop_x0) * steps, "matmul": MATMUL_REPS * 2 * cfg.matmul_size**3}
    rate = {name: float(np.median(work[name] / s)) for name, s in seconds.items()}
    median_seconds = {name: float(np.median(s)) for name, s in seconds.items()}
    flops = model_flops_per_image_step(model, x0)
    # The plan the engine runs drops kernel taps that only ever read padding: FLOPs it actually executes.
    with frozen_eval(model):
        plan_flops = model_flops_per_image_step(execution_model(model, x0, seed_cfg), x0)
    # Equal work on both sides except against the seed loop (fewer images) and the matmul (FLOPs, not steps).
    ratios = {
        "speedup_vs_seed_loop": paired_ratio(seconds["seed_loop"], seconds["engine"], n / len(loop_x0)),
        "ratio_vs_torchattacks": paired_ratio(seconds["torchattacks_pgd"], seconds["engine_pgd"]),
        "recording_overhead": paired_ratio(seconds["engine"], seconds["engine_unrecorded"]),
        "early_stop_gain": paired_ratio(seconds["full_budget"], seconds["early_stop"]),
        "roofline": paired_ratio(seconds["matmul"], seconds["engine"], flops * n * steps / work["matmul"]),
    }
    engine, full, early = runs["engine"], runs["full_budget"], runs["early_stop"]
    engine_final, loop_final = torch.from_numpy(engine.x_final).to(device), runs["seed_loop"]
    pgd_final, ta_final = torch.from_numpy(runs["engine_pgd"].x_final).to(device), runs["torchattacks_pgd"]

    quality: dict[str, object] = {}
    started = time.perf_counter()
    mine = torch.from_numpy(optimize(model, x0, engine_config("min_l2", cfg.quality_steps)).x_final).to(device)
    quality["min_l2_seconds"] = round(time.perf_counter() - started, 3)
    quality["min_l2_median_l2"], quality["min_l2_success"] = perturbation_quality(model, x0, mine)
    refs: dict[str, tuple[float, float]] = {}
    for name, adv in reference_attacks(model, x0, cfg.quality_steps).items():
        refs[name] = perturbation_quality(model, x0, adv)
        quality[f"{name}_median_l2"], quality[f"{name}_success"] = refs[name]
    best_ref = min(refs, key=lambda k: (refs[k][0], -refs[k][1]))
    quality["reference"] = best_ref
    mine_l2, ref_l2 = quality["min_l2_median_l2"], refs[best_ref][0]
    quality["min_l2_vs_reference"] = mine_l2 / ref_l2 if math.isfinite(mine_l2) and math.isfinite(ref_l2) else math.nan

    return {
        "arch": spec.arch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "n": n,
        "steps": steps,
        "repeats": cfg.repeats,
        "engine_rate": rate["engine"],
        "engine_unrecorded_rate": rate["engine_unrecorded"],
        # Its spread is that of the rate ratio unrecorded / recorded, not of the few-percent difference.
        **ratio_fields("recording_overhead", ratios["recording_overhead"], shift=-1.0),
        "seed_loop_n": len(loop_x0),
        "seed_loop_rate": rate["seed_loop"],
        **ratio_fields("speedup_vs_seed_loop", ratios["speedup_vs_seed_loop"]),
        "seed_loop_max_abs_diff": float((loop_final - engine_final[: len(loop_x0)]).abs().max()),
        "seed_loop_same_class": float((_classes(model, loop_final) == _classes(model, engine_final[: len(loop_x0)])).float().mean()),
        "engine_pgd_rate": rate["engine_pgd"],
        "torchattacks_pgd_rate": rate["torchattacks_pgd"],
        **ratio_fields("ratio_vs_torchattacks", ratios["ratio_vs_torchattacks"]),
        # The same attack by an independent implementation: starts whose final images agree to 1e-4, and classes.
        # Trajectories part where rounding decides a near-tie in a ReLU or max-pool, more often the deeper the net.
        "torchattacks_pgd_agree": _agree(pgd_final, ta_final),
        "torchattacks_pgd_same_class": float((_classes(model, pgd_final) == _classes(model, ta_final)).float().mean()),
        # Its yardstick: torchattacks against itself on the first half of the batch (other kernels, other rounding).
        "torchattacks_self_agree": _agree(torchattacks_pgd(model, x0[: max(1, n // 2)], steps), ta_final[: max(1, n // 2)]),
        "flops_per_image_step": flops,
        "matmul_flops_per_s": rate["matmul"],
        **ratio_fields("roofline", ratios["roofline"]),
        "executed_flops_per_image_step": plan_flops,
        "executed_roofline": ratios["roofline"].median * plan_flops / flops,
        "full_budget_seconds": median_seconds["full_budget"],
        "early_stop_seconds": median_seconds["early_stop"],
        **ratio_fields("early_stop_gain", ratios["early_stop_gain"]),
        "early_stop_flipped": float(np.mean(early.flip_step >= 0)),
        "early_stop_same_flip_steps": bool(np.array_equal(early.flip_step, full.flip_step)),
        "quality_steps": cfg.quality_steps,
        **quality,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("small_cnn", "resnet18", "resnet34"), default="small_cnn")
    p.add_argument("--n", type=int, default=None, help="starts in the batch (256)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per contender (20)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds; figures are medians over them (9)")
    p.add_argument("--quality-steps", type=int, default=None, help="steps of min_l2, FMN and DDN (100)")
    p.add_argument("--mnist-dir", type=Path, default=None, help="MNIST IDX files to train the detector on")
    p.add_argument("--model-dir", type=Path, default=None, help="a trained model directory to use instead")
    p.add_argument("--cache-dir", type=Path, default=Path(".eightgen-cache/bench"))
    p.add_argument("--quick", action="store_true", help="smallest run: a handful of starts and steps, three rounds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write its figures to stdout as one JSON line."""
    args = parse_args(argv)
    given = {
        k: v
        for k, v in dict(n=args.n, steps=args.steps, repeats=args.repeats, quality_steps=args.quality_steps).items()
        if v is not None
    }
    try:
        for k, v in given.items():
            if v <= 0:
                raise EightgenError(f"--{k.replace('_', '-')} must be positive, got {v}")
        cfg = BenchConfig(arch=args.arch, device=args.device, threads=args.threads, **{**(QUICK if args.quick else {}), **given})
        model_dir, dataset_dir = model_for(args, cfg.arch, cfg.epochs)
        malloc = keep_freed_memory()
        result = run_bench(cfg, model_dir, dataset_dir)
    except EightgenError as exc:
        sys.stderr.write(f"benchmarks.bench: error: {exc}\n")
        return 2
    result["malloc_tuned"] = malloc
    wide = [f"{k} {result[k + '_spread']:.2f}" for k in HEADLINE if not result[f"{k}_trusted"]]
    if wide:
        cpus, load = os.cpu_count() or 1, result["load_average_1m"]
        # More runnable threads than CPUs: each of torch's parallel regions waits for its last thread to be scheduled.
        hint = f"; load average {load} on {cpus} CPUs: try --threads 1" if result["threads"] > 1 and load > cpus else ""
        sys.stderr.write(
            f"benchmarks.bench: warning: not to be trusted (IQR/median > {TRUST_SPREAD}, or {cfg.repeats} rounds"
            f" < {TRUST_ROUNDS}): {', '.join(wide)}{hint}\n"
        )
    # A median over mostly failed attacks is infinite: JSON null.
    result = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
