"""`eightgen diffusion`: three ways to the target from identical starts (standard gradient, robust gradient, guided
diffusion), judged by the referees, with its targets."""

from __future__ import annotations

import argparse
from typing import Any

from cli.options import Places, apply_shared, data_options, device_option, digits_option, storage_options
from eightgen.config import DiffusionConfig
from reports.files import DIFFUSION_JSON
from runtime.environment import process_env

# option dest -> (config path of each field it sets); the shared options are applied by cli.options.apply_shared
OVERRIDES: dict[str, tuple[tuple[str, ...], ...]] = {
    "max_train": (("aligned", "dataset", "max_train"),),
    "pool_per_digit": (("aligned", "dataset", "pool_per_digit"),),
    "valid_fraction": (("aligned", "dataset", "valid_fraction"),),
    "referee_fraction": (("aligned", "dataset", "referee_fraction"),),
    "epochs": (("aligned", "standard", "epochs"), ("aligned", "robust", "epochs")),
    "adv_eps": (("aligned", "robust", "adv_eps"),),
    "adv_steps": (("aligned", "robust", "adv_steps"),),
    "referee_epochs": (("aligned", "referees", "epochs"),),
    "referee_eps": (("aligned", "referees", "robust_eps"),),
    "seeds": (("aligned", "attack", "seeds"),),
    "starts_per_digit": (("aligned", "attack", "starts_per_digit"),),
    "steps": (("aligned", "attack", "steps"),),
    "noise": (("aligned", "attack", "include_noise"),),
    "denoiser_epochs": (("denoiser", "epochs"),),
    "denoiser_widths": (("denoiser", "widths"),),
    "denoiser_max_train": (("denoiser", "max_train"),),
    "denoiser_lr": (("denoiser", "lr"),),
    "timesteps": (("denoiser", "timesteps"),),
    "schedule": (("denoiser", "schedule"),),
    "ema_decay": (("denoiser", "ema_decay"),),
    "unguided_seeds": (("unguided_seeds",),),
    "frechet_n": (("frechet_n",),),
    "check_per_class": (("check_per_class",),),
    "check_level": (("check_level",),),
    "guidance": (("guidance",),),
    "guidance_scale": (("guidance_scale",),),
    "ddim_steps": (("ddim_steps",),),
    "start_level": (("start_level",),),
    "chunk_size": (("chunk_size",), ("aligned", "attack", "chunk_size")),
    "grid_seeds": (("grid_seeds",), ("aligned", "grid_seeds")),
}

PLACES = Places(
    dataset=("aligned", "dataset"),
    attacks=(("aligned", "attack"),),
    storage=("aligned",),
    devices=((), ("denoiser",), ("aligned", "standard"), ("aligned", "robust"), ("aligned", "referees"), ("aligned", "attack")),
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_diffusion_options(p: argparse.ArgumentParser) -> None:
    """The options of `eightgen diffusion` (defaults: DiffusionConfig)."""
    d = DiffusionConfig()
    a = d.aligned
    g = p.add_argument_group("data")
    data_options(g)
    g.add_argument("--max-train", type=int, help=f"cap the detectors' training split (default {a.dataset.max_train})")
    g.add_argument("--pool-per-digit", type=int, help=f"start pool images per digit (default {a.dataset.pool_per_digit})")
    g.add_argument("--valid-fraction", type=float, help=f"share of training-split images for validation (default {a.dataset.valid_fraction})")
    g.add_argument("--referee-fraction", type=float, help=f"share of test-split images for the referees (default {a.dataset.referee_fraction})")
    g = p.add_argument_group("detectors, referees and gradient paths (the aligned experiment at its matched budget)")
    g.add_argument("--epochs", type=int, help=f"training epochs of both detectors (default {a.standard.epochs})")
    g.add_argument("--adv-eps", type=float, help=f"L2 PGD radius of the robust detector's training (default {a.robust.adv_eps})")
    g.add_argument("--adv-steps", type=int, help=f"PGD steps per training batch (default {a.robust.adv_steps})")
    g.add_argument("--referee-epochs", type=int, help=f"training epochs of each referee (default {a.referees.epochs})")
    g.add_argument("--referee-eps", type=float, help=f"L2 PGD radius of the robust referee (default {a.referees.robust_eps})")
    g.add_argument("--budget", type=float, help=f"L2 budget of the gradient paths (default {a.matched_budget:g})")
    g.add_argument("--seeds", type=int, help=f"noise starts (default {a.attack.seeds})")
    g.add_argument("--starts-per-digit", type=int, help=f"starts of each start digit (default {a.attack.per_digit})")
    g.add_argument("--steps", type=int, help=f"gradient steps per start (default {a.attack.steps})")
    digits_option(g)
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, default=None, help="include noise starts")
    g = p.add_argument_group("denoiser and sampling")
    g.add_argument("--denoiser-epochs", type=int, help=f"denoiser training epochs (default {d.denoiser.epochs})")
    g.add_argument("--denoiser-widths", type=_ints, help=f"U-Net channels at 28, 14, 7 pixels (default {','.join(map(str, d.denoiser.widths))})")
    g.add_argument("--denoiser-max-train", type=int, help="cap the denoiser's training images (default: the whole training split)")
    g.add_argument("--denoiser-lr", type=float, help=f"denoiser learning rate (default {d.denoiser.lr})")
    g.add_argument("--timesteps", type=int, help=f"diffusion timesteps (default {d.denoiser.timesteps})")
    g.add_argument("--schedule", help=f"noise schedule, linear or cosine (default {d.denoiser.schedule})")
    g.add_argument("--ema-decay", type=float, help=f"decay of the denoiser's weight average, 0 for none (default {d.denoiser.ema_decay})")
    g.add_argument("--guidance", type=_names, help="paths, of none, standard, robust (default all three)")
    g.add_argument("--guidance-scale", type=float, help=f"L2 move of x̂₀ per step at full noise (default {d.guidance_scale:g})")
    g.add_argument("--ddim-steps", type=int, help=f"DDIM steps from noise (default {d.ddim_steps})")
    g.add_argument("--start-level", type=float, help=f"noise level of real starts, 0-1 (default {d.start_level})")
    g.add_argument("--chunk-size", type=int, help="starts per sampling and optimisation task")
    g.add_argument("--grid-seeds", type=int, help=f"starts per digit in the image grids (default {d.grid_seeds})")
    g = p.add_argument_group("judging")
    g.add_argument("--unguided-seeds", type=int, help=f"noise seeds of the one-in-ten check of unguided samples (default {d.unguided_seeds})")
    g.add_argument("--frechet-n", type=int, help="images per Fréchet sample (default: the most that every row can have)")
    g.add_argument("--check-per-class", type=int, help=f"real images per class in the judges' real-image check (default {d.check_per_class})")
    g.add_argument("--check-level", type=float, help=f"noise level of the real-image check's denoiser round trip (default {d.check_level})")
    device_option(g)
    g = p.add_argument_group("where")
    storage_options(g, "experiment directory", "diffusion + settings hash; --run-name names the aligned one, the diffusion one adds -diffusion")
    g.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")


def build_diffusion_config(args: argparse.Namespace) -> DiffusionConfig:
    """DiffusionConfig defaults + command-line overrides + the shared options, validated."""
    data: dict[str, Any] = DiffusionConfig().model_dump()
    for dest, fields in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for path in fields:
            *parents, last = path
            node = data
            for key in parents:
                node = node[key]
            node[last] = value
    if getattr(args, "budget", None) is not None:
        data["aligned"]["budgets"] = (args.budget,)
        data["aligned"]["matched_budget"] = args.budget
    apply_shared(data, args, PLACES)
    return DiffusionConfig.model_validate(data)


def summary_lines(summary: dict) -> list[str]:
    """The three-ways summary as plain text: one line per path and start kind, then the targets."""
    from reports.formatting import fmt_bracket as pct
    from reports.formatting import target_line

    num = lambda x, d: "—" if x is None or x != x else f"{x:.{d}f}"  # noqa: E731
    name = summary["target_name"]
    lines = [f"{'path':<31} {'starts':<6} {'n':>4} {'kNN10 ' + name:>16} {'kNN2 ' + name:>16} {'robust ' + name:>16} {'Fréchet':>8} {'divers.':>7} {'L2':>5}"]
    for c in summary["cells"]:
        lines.append(
            f"{c['label']:<31} {c['kind']:<6} {c['n']:>4} {pct(c['knn10']):>16} {pct(c['knn2']):>16} {pct(c['robust']):>16} "
            f"{num(c['frechet'], 1):>8} {num(c['diversity'], 2):>7} {num(c['l2_median'], 2):>5}"
        )
    if summary.get("sanity"):
        c = summary["sanity"]
        lines.append(f"{'diffusion, unguided (sanity)':<31} {'noise':<6} {c['n']:>4} {pct(c['knn10']):>16} {pct(None):>16} {pct(c['robust']):>16}")
    if summary.get("frechet"):
        f = summary["frechet"]
        lines.append(f"Fréchet at n = {f['n']}: floor (a second sample of real {name}s) {f['floor']:.1f}, ceiling (real other classes) {f['ceiling']:.1f}")
    if summary.get("judge_check"):
        j = summary["judge_check"]
        trip = j["variants"]["round trip"]
        said = "; ".join(f"{who} {pct(trip[who]['recall'][summary['target']])}" for who in trip)
        lines.append(f"real {name}s after a round trip called {name}: {said}; one-in-ten judged by {j['judge']}")
    lines.append("targets:")
    lines += [target_line(t) for t in summary["targets"]]
    return lines


def diffusion_command(args: argparse.Namespace) -> int:
    """Validate, run the diffusion flow, wait for its records, print the summary and the targets."""
    cfg = build_diffusion_config(args)
    aligned = cfg.aligned
    process_env(aligned.cache_dir)
    from cli.lifecycle import finish, run_experiment

    report, summary = run_experiment("diffusion experiment", cfg, aligned, "flows.diffusion:diffusion_flow", DIFFUSION_JSON, args)
    return finish(report, summary_lines(summary), args.check, summary["targets_met"])
