"""`eightgen aligned`: standard vs robust detector over a sweep of L2 budgets, judged by referees, with its targets."""

from __future__ import annotations

import argparse
from typing import Any

from cli.options import Places, apply_shared, count_or_all, data_options, device_option, digits_option, storage_options
from eightgen.config import AlignedConfig, referee_eps_for
from eightgen.errors import EightgenError
from reports.files import ALIGNED_JSON
from runtime.environment import process_env

OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    # option dest -> (config sections it sets, field); the shared options are applied by cli.options.apply_shared
    "max_train": (("dataset",), "max_train"),
    "pool_per_digit": (("dataset",), "pool_per_digit"),
    "valid_fraction": (("dataset",), "valid_fraction"),
    "referee_fraction": (("dataset",), "referee_fraction"),
    "epochs": (("standard", "robust"), "epochs"),
    "eval_eps": ((), "eval_eps"),
    "adv_steps": (("robust",), "adv_steps"),
    "referee_epochs": (("referees",), "epochs"),
    "referee_eps": (("referees",), "robust_eps"),
    "seeds": (("attack",), "seeds"),
    "starts_per_digit": (("attack",), "starts_per_digit"),
    "steps": (("attack",), "steps"),
    "noise": (("attack",), "include_noise"),
    "chunk_size": (("attack",), "chunk_size"),
    "budgets": ((), "budgets"),
    "matched_budget": ((), "matched_budget"),
    "grid_seeds": ((), "grid_seeds"),
}

PLACES = Places(dataset=("dataset",), attacks=(("attack",),), storage=(), devices=(("standard",), ("robust",), ("referees",), ("attack",)))


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_aligned_options(p: argparse.ArgumentParser) -> None:
    """The options of `eightgen aligned` (defaults: AlignedConfig)."""
    d = AlignedConfig()
    g = p.add_argument_group("data")
    data_options(g)
    g.add_argument("--max-train", type=int, help="cap the detectors' training split")
    g.add_argument("--pool-per-digit", type=int, help=f"attack-start pool images per digit (default {d.dataset.pool_per_digit})")
    g.add_argument("--valid-fraction", type=float, help=f"share of non-pool images for validation (default {d.dataset.valid_fraction})")
    g.add_argument("--referee-fraction", type=float, help=f"share of non-pool images held out for the referees (default {d.dataset.referee_fraction})")
    g = p.add_argument_group("detectors and referees")
    g.add_argument("--epochs", type=int, help=f"training epochs of both detectors (default {d.standard.epochs})")
    g.add_argument(
        "--adv-eps", type=_numbers,
        help=f"training radii, one detector each, e.g. 0,0.25,0.5,1,2,3 (0: standard training; one radius X: the pair 0,X; default 0,{d.robust.adv_eps:g})",
    )
    g.add_argument("--eval-eps", type=float, help="L2 radius of every detector's robust-accuracy check (default: the robust detector's, 2)")
    g.add_argument("--adv-steps", type=int, help=f"PGD steps per training batch (default {d.robust.adv_steps})")
    g.add_argument("--referee-epochs", type=int, help=f"training epochs of each 10-class referee (default {d.referees.epochs})")
    g.add_argument("--referee-eps", type=float, help=f"L2 PGD radius of the robust referee (default {d.referees.robust_eps})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--budgets", type=_numbers, help=f"L2 budgets, e.g. 1,2,4,6,8 (default {','.join(f'{b:g}' for b in d.budgets)})")
    g.add_argument("--matched-budget", type=float, help=f"budget at which the targets are checked (default {d.matched_budget:g})")
    g.add_argument("--seeds", type=int, help=f"noise starts, and starts per start class unless --starts-per-digit is given (default {d.attack.seeds})")
    g.add_argument("--starts-per-digit", type=count_or_all, help="starts per start class: N or 'all' (every held-out image of the class)")
    g.add_argument("--steps", type=int, help=f"gradient steps per start (default {d.attack.steps})")
    digits_option(g)
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, default=None, help="include uniform-noise starts")
    g.add_argument("--chunk-size", type=int, help="starts per optimisation task")
    g.add_argument("--grid-seeds", type=int, help=f"starts per digit in the image grid (default {d.grid_seeds})")
    device_option(g)
    g = p.add_argument_group("where")
    storage_options(g, "experiment directory", "aligned + settings hash")
    g.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")


def build_aligned_config(args: argparse.Namespace) -> AlignedConfig:
    """AlignedConfig defaults + command-line overrides + the shared options, validated."""
    data: dict[str, Any] = AlignedConfig().model_dump()
    for dest, (sections, field) in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for section in sections or (None,):
            (data[section] if section else data)[field] = value
    radii = getattr(args, "adv_eps", None)
    if radii is not None:
        apply_radii(data, radii, referee_eps_given=getattr(args, "referee_eps", None) is not None)
    apply_shared(data, args, PLACES)
    return AlignedConfig.model_validate(data)


def apply_radii(data: dict[str, Any], radii: tuple[float, ...], referee_eps_given: bool) -> None:
    """Set the training radii in an AlignedConfig dump: one radius X or the pair 0,X is the classic pair (robust.adv_eps X,
    so its run names and cache entries stay those of the classic experiment); any other list is a sweep. Unless the
    referee radius was given, it is raised to exceed the largest training radius."""
    classic = sorted(radii)
    if len(classic) == 1 and classic[0] != 0 or len(classic) == 2 and classic[0] == 0 < classic[1]:
        data["robust"]["adv_eps"] = classic[-1]
    else:
        data["radii"] = list(radii)
    if not referee_eps_given and all(r == r for r in radii):
        data["referees"]["robust_eps"] = referee_eps_for(tuple(radii), data["referees"]["robust_eps"])


def summary_lines(summary: dict) -> list[str]:
    """The aligned summary as plain text lines: one per (budget, detector), then the targets."""
    from reports.formatting import fmt_bracket as ci
    from reports.formatting import target_line

    name = str(summary.get("target_name", "target"))[:10]
    lines = [
        f"{'budget':>6} {'detector':<9} {'n':>4} {'flipped':>16} {'L2':>5} {'kNN ' + name:>16} {'robust ' + name:>16} {'std ' + name:>16} {'still start':>16}"
    ]
    for c in summary["cells"]:
        d = c["digits"]
        if d is None:
            continue
        l2 = d["l2_final_median"]
        lines.append(
            f"{c['budget']:>6g} {c['detector']:<9} {d['n']:>4} {ci(d['success']):>16} {'—' if l2 is None else f'{l2:.2f}':>5} "
            f"{ci(d['referees']['knn']):>16} {ci(d['referees']['robust']):>16} {ci(d['referees']['cnn']):>16} "
            f"{ci(d['still_start']['robust']):>16}"
        )
    lines.append("shares with exact 95% intervals; a target is judged on the interval's bound")
    lines.append(f"targets at budget {summary['matched_budget']:g}:")
    lines += [target_line(t) for t in summary["targets"]]
    return lines


def sweep_lines(sweep: dict) -> list[str]:
    """The sweep as plain text lines: per training radius the clean error, the robust accuracy and the k-NN share at each budget."""
    from reports.formatting import fmt_bracket

    ci = lambda x: fmt_bracket(x, 1)  # noqa: E731
    ev = sweep["eval"]
    rob = f"robust acc (ε {ev['eps']:g})" if ev else "robust acc"
    knn = {(p["detector"], c["budget"]): p for c in sweep["curves"] if c["referee"] == "knn" for p in c["points"]}
    lines = [f"{'radius':>6} {'clean error':>20} {rob:>20} " + " ".join(f"{f'kNN at {b:g}':>20}" for b in sweep["budgets"])]
    for d in sweep["detectors"]:
        shares = " ".join(f"{ci(knn.get((d['detector'], b))):>20}" for b in sweep["budgets"])
        lines.append(f"{d['radius']:>6g} {ci(d['clean_error']):>20} {ci(d['robust_accuracy']):>20} {shares}")
    lines.append(sweep["answer"])
    return lines


def aligned_command(args: argparse.Namespace) -> int:
    """Validate, run the aligned flow, wait for its records, print the summary and the targets."""
    cfg = build_aligned_config(args)
    if args.check and (cfg.reference_radius is None or 0 not in cfg.radii_in_force):
        raise EightgenError("--check needs the standard and a robust detector: give 0 and a radius above 0 in --adv-eps")
    process_env(cfg.cache_dir)
    from cli.lifecycle import finish, run_experiment

    report, summary = run_experiment("aligned experiment", cfg, cfg, "flows.aligned:aligned_flow", ALIGNED_JSON, args)
    lines = summary_lines(summary) + (sweep_lines(summary["sweep"]) if summary.get("sweep") else [])
    return finish(report, lines, args.check, summary["targets_met"])
