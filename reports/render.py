"""Render a run directory (or several, side by side) into one self-contained HTML report."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.figure import Figure
from PIL import Image

from eightgen.config import AttackConfig, ReportConfig
from eightgen.errors import EightgenError
from eightgen.rundir import REPORT, RESULTS, TRAJECTORIES, RunRecord, is_run_dir, load_record, verify_run, write_report
from reports import figures, stats
from reports.stats import ALL, NOISE

REQUIRED_COLUMNS = (
    "run_id",
    "start_kind",
    "start_digit",
    "seed",
    "steps",
    "p_target_start",
    "p_target_final",
    "success",
    "flip_step",
    "l2_final",
    "l2_at_flip",
    "linf_final",
)
DPI = 100  # CSS pixels per inch of a figure
SCALE = 2  # figures are drawn at SCALE x DPI so they stay sharp on high-density screens
MAX_ANIMATIONS = 4
MAX_ANIMATION_FRAMES = 60
PIXELS = 28 * 28


@dataclass
class Run:
    """What a report needs from one run directory (everything but the image snapshots)."""

    path: Path
    name: str
    record: RunRecord
    results: pd.DataFrame  # one row per start, with columns group and traj_row (row in trajectories.npz)
    p_target: np.ndarray  # [n_traj, steps + 1]
    snapshot_steps: np.ndarray
    report: ReportConfig
    target: int
    table: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        self.table = stats.group_table(self.results)

    @property
    def order(self) -> list[str]:
        """Start groups in display order."""
        return stats.group_order(self.results["group"])

    @property
    def attack(self) -> AttackConfig:
        """The attack settings of the run."""
        return self.record.config.attack


def load_run(run_dir: Path) -> Run:
    """Read a verified run directory: its record, results.parquet and the per-step arrays of trajectories.npz."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EightgenError(f"{run_dir}: run directory not found")
    record = load_record(run_dir)
    verify_run(run_dir)
    try:
        results = pd.read_parquet(run_dir / RESULTS)
    except (OSError, ValueError) as exc:
        raise EightgenError(f"{run_dir / RESULTS}: unreadable ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in results]
    if missing:
        raise EightgenError(f"{run_dir / RESULTS}: missing columns {', '.join(missing)}")
    if results.empty:
        raise EightgenError(f"{run_dir / RESULTS}: no rows")
    npz_path = run_dir / TRAJECTORIES
    if not npz_path.is_file():
        raise EightgenError(f"{run_dir}: no trajectories.npz")
    with np.load(npz_path) as npz:
        for key in ("p_target", "snapshot_steps", "snapshots"):
            if key not in npz.files:
                raise EightgenError(f"{npz_path}: no array {key!r}")
        p_target = npz["p_target"].astype(np.float32)
        snapshot_steps = npz["snapshot_steps"].astype(np.int64)
        traj_ids = npz["run_id"].astype(str) if "run_id" in npz.files else None
    results = results.reset_index(drop=True)
    results["traj_row"] = _align(results["run_id"].astype(str).to_numpy(), traj_ids, len(p_target), npz_path)
    results["group"] = stats.group_labels(results)
    if 0 not in snapshot_steps:
        raise EightgenError(f"{npz_path}: snapshot_steps lacks step 0 (the start)")
    return Run(run_dir, record.run_name, record, results, p_target, snapshot_steps, record.config.report, record.target)


def _align(result_ids: np.ndarray, traj_ids: np.ndarray | None, n_traj: int, where: Path) -> np.ndarray:
    """Row of every results row in the trajectory arrays (matched by run_id)."""
    if traj_ids is None:
        if n_traj != len(result_ids):
            raise EightgenError(f"{where}: {n_traj} trajectories but {len(result_ids)} results rows and no run_id")
        return np.arange(n_traj)
    index = pd.Index(traj_ids)
    if not index.is_unique:
        raise EightgenError(f"{where}: run_id values repeat")
    rows = index.get_indexer(result_ids)
    if (rows < 0).any():
        raise EightgenError(f"{where}: no trajectory for run_id {result_ids[rows < 0][0]!r}")
    return rows


def read_snapshots(npz_path: Path, rows: Iterable[int], step0: int, *, chunk_rows: int = 256) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Snapshots [k, C, 28, 28] of the given trajectory rows, and the L2 norm of every row's start image.

    Streams the compressed array in chunks so memory stays small however many trajectories the run holds.
    """
    wanted = sorted(set(int(r) for r in rows))
    with zipfile.ZipFile(npz_path) as zf, zf.open("snapshots.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            return _snapshots_in_memory(npz_path, wanted, step0)
        shape, fortran, dtype = reader(f)
        if fortran:
            return _snapshots_in_memory(npz_path, wanted, step0)
        n, row_shape = shape[0], shape[1:]
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        picked: dict[int, np.ndarray] = {}
        norms = np.empty(n, np.float64)
        queue = iter(wanted)
        nxt = next(queue, None)
        for start in range(0, n, chunk_rows):
            m = min(chunk_rows, n - start)
            block = np.frombuffer(f.read(m * row_bytes), dtype=dtype).reshape(m, *row_shape)
            first = block[:, step0].astype(np.float32).reshape(m, -1)
            norms[start : start + m] = np.sqrt(np.einsum("ij,ij->i", first, first))
            while nxt is not None and nxt < start + m:
                picked[nxt] = block[nxt - start].astype(np.float32)
                nxt = next(queue, None)
    return picked, norms


def _snapshots_in_memory(npz_path: Path, wanted: list[int], step0: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    with np.load(npz_path) as npz:
        snaps = npz["snapshots"]
    first = snaps[:, step0].astype(np.float32).reshape(len(snaps), -1)
    return {r: snaps[r].astype(np.float32) for r in wanted}, np.linalg.norm(first, axis=1)


# ---------------------------------------------------------------- formatting


def _nan(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def fmt_num(x, digits: int = 2) -> str:
    """A number with fixed decimals, an em dash when missing."""
    return "—" if _nan(x) else f"{float(x):,.{digits}f}"


def fmt_pct(x, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage."""
    return "—" if _nan(x) else f"{100 * float(x):.{digits}f}%"


def fmt_prob(x) -> str:
    """A probability: three decimals, scientific notation below 0.001."""
    if _nan(x):
        return "—"
    x = float(x)
    return f"{x:.1e}" if 0 < x < 1e-3 else f"{x:.3f}"


def fmt_step(x) -> str:
    """A step number (medians may fall between steps)."""
    if _nan(x):
        return "—"
    x = float(x)
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def fmt_scale(x) -> str:
    """A colour-scale bound with two significant digits."""
    return "—" if _nan(x) else f"{float(x):.2g}"


def fmt_int(x) -> str:
    """An integer with thousands separators."""
    return "—" if _nan(x) else f"{int(x):,}"


def fmt_raw(x) -> str:
    """A number at full precision for a data-value attribute ("nan" when missing)."""
    return "nan" if _nan(x) else repr(float(x))


def _json_safe(x):
    if x is None or x is pd.NA:
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


@cache
def _env() -> Environment:
    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt_num, pct=fmt_pct, prob=fmt_prob, step=fmt_step, int=fmt_int, raw=fmt_raw, scale=fmt_scale)
    return env


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class Img:
    """An embedded image: data URI, pixel size, alt text and optional caption."""

    src: str
    width: int
    height: int
    alt: str
    caption: str = ""
    id: str = ""


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def figure_img(fig: Figure, alt: str, caption: str = "", id: str = "") -> Img:
    """A matplotlib figure as an embedded PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI * SCALE)
    image = Image.open(io.BytesIO(buf.getvalue()))
    # A 256-colour palette keeps plots sharp at about a third of the bytes.
    small = io.BytesIO()
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(small, format="PNG")
    png = small.getvalue() if small.tell() < buf.tell() else buf.getvalue()
    return Img(_data_uri(png), round(image.width / SCALE), round(image.height / SCALE), alt, caption, id)


def array_img(pixels: np.ndarray, alt: str) -> Img:
    """A small uint8 grey [H, W] or RGB [H, W, 3] array as an embedded PNG (scaled up by the browser)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return Img(_data_uri(buf.getvalue()), pixels.shape[1], pixels.shape[0], alt)


# ---------------------------------------------------------------- single run


def _sample_rows(run: Run) -> dict[str, list[int]]:
    """Results rows shown as film strips: up to strips_per_digit per group, sampled with a fixed RNG."""
    chosen: dict[str, list[int]] = {}
    for g in run.order:
        sub = run.results[run.results["group"] == g]
        k = min(run.report.strips_per_digit, len(sub))
        rng = np.random.default_rng(stats.stable_seed(g))
        picked = sub.iloc[np.sort(rng.choice(len(sub), size=k, replace=False))]
        chosen[g] = list(picked.sort_values("seed").index)
    return chosen


def _gallery_rows(run: Run) -> tuple[list[int], list[int]]:
    """Most and least changed successful starts by l2_final (gallery_size each)."""
    ok = run.results[stats.as_bool(run.results["success"])]
    ok = ok.assign(_l2=stats.as_float(ok["l2_final"])).sort_values(["_l2", "run_id"], kind="stable")
    k = run.report.gallery_size
    most = list(ok.index[::-1][:k])
    least = list(ok.index[:k])
    return most, least


def _animation_rows(run: Run) -> list[int]:
    """A few trajectories to animate: groups spread over the display order, the median-flip success of each."""
    order = run.order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(MAX_ANIMATIONS, len(order)))).astype(int))
    rows = []
    for g in (order[i] for i in picks):
        sub = run.results[run.results["group"] == g]
        flip = stats.as_float(sub["flip_step"])
        ok = stats.as_bool(sub["success"]) & ~np.isnan(flip)
        if ok.any():
            median = np.median(flip[ok])
            rows.append(sub.index[ok][np.argmin(np.abs(flip[ok] - median))])
        else:
            rows.append(sub.index[np.argmax(stats.as_float(sub["p_target_final"]))])
    return rows


def _start_label(row: pd.Series) -> str:
    return "noise" if row["group"] == NOISE else f"digit {row['group']}"


def _plain(row: pd.Series) -> dict:
    """A results row with plain Python values (None for missing) for the templates."""
    return {k: _json_safe(v) for k, v in row.items()}


def _frames(run: Run, snaps: np.ndarray, traj_row: int, indices: Sequence[int], plabel: str, who: str) -> list[dict]:
    out = []
    for k in indices:
        step = int(run.snapshot_steps[k])
        p = float(run.p_target[traj_row, step]) if step < run.p_target.shape[1] else float("nan")
        img = array_img(figures.grey_uint8(snaps[k]), f"{who}, step {step}, {plabel} = {fmt_prob(p)}")
        out.append({"img": img, "step": step, "p": fmt_prob(p), "flipped": p > 0.5})
    return out


def _heat(delta: np.ndarray, who: str, what: str) -> tuple[Img, float]:
    d = delta.mean(axis=0) if delta.ndim == 3 else delta
    vmax = float(np.abs(d).max())
    img = array_img(figures.diverging_rgb(d, vmax), f"{who}: {what} as a heat map, symmetric scale ±{vmax:.2g}")
    return img, vmax


def _strips(run: Run, chosen: dict[str, list[int]], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    k = len(run.snapshot_steps)
    indices = np.unique(np.round(np.linspace(0, k - 1, min(run.report.frames_per_strip, k))).astype(int))
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    groups = []
    for g, rows in chosen.items():
        strips = []
        for i in rows:
            row = run.results.loc[i]
            traj = int(row["traj_row"])
            who = f"{_start_label(row)}, seed {row['seed']}"
            frames = _frames(run, snaps[traj], traj, indices, plabel, who)
            heat, vmax = _heat(snaps[traj][-1] - snaps[traj][step0], who, "final perturbation x_final - x0")
            strips.append({"who": who, "run_id": str(row["run_id"]), "row": _plain(row), "frames": frames, "heat": heat, "vmax": vmax})
        groups.append({"group": g, "title": figures.group_title(g), "strips": strips})
    return groups


def _gallery(run: Run, rows: list[int], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    items = []
    for i in rows:
        row = run.results.loc[i]
        traj = int(row["traj_row"])
        s = snaps[traj]
        who = f"{_start_label(row)}, seed {row['seed']}"
        heat, vmax = _heat(s[-1] - s[step0], who, "perturbation")
        items.append(
            {
                "row": _plain(row),
                "who": who,
                "start": array_img(figures.grey_uint8(s[step0]), f"{who}: start image"),
                "final": array_img(figures.grey_uint8(s[-1]), f"{who}: final image, {plabel} = {fmt_prob(row['p_target_final'])}"),
                "heat": heat,
                "vmax": vmax,
            }
        )
    return items


def _animations(run: Run, rows: list[int], snaps: dict[int, np.ndarray], plabel: str) -> list[dict]:
    k = len(run.snapshot_steps)
    indices = np.unique(np.round(np.linspace(0, k - 1, min(k, MAX_ANIMATION_FRAMES))).astype(int))
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    out = []
    for n, i in enumerate(rows):
        row = run.results.loc[i]
        traj = int(row["traj_row"])
        s = snaps[traj]
        who = f"{_start_label(row)}, seed {row['seed']}"
        deltas = (s - s[step0]).mean(axis=1)
        vmax = float(np.abs(deltas).max())
        frames = _frames(run, s, traj, indices, plabel, who)
        heats = [
            array_img(figures.diverging_rgb(deltas[k_], vmax), f"{who}: change x_t - x0 at step {run.snapshot_steps[k_]}, scale ±{vmax:.2g}")
            for k_ in indices
        ]
        out.append(
            {
                "id": f"anim-{n}",
                "who": who,
                "row": _plain(row),
                "vmax": vmax,
                "first": frames[0]["img"],
                "first_heat": heats[0],
                "data": {
                    "who": who,
                    "frames": [f["img"].src for f in frames],
                    "heats": [h.src for h in heats],
                    "steps": [f["step"] for f in frames],
                    "p": [f["p"] for f in frames],
                },
            }
        )
    return out


def _channels(run: Run) -> int:
    return int(run.record.model.spec.get("channels") or run.record.config.train.channels)


def headline(run: Run, x0_norms: np.ndarray | None = None) -> dict:
    """The key numbers of a run: what ran, on what, and what came out."""
    res, all_row = run.results, run.table[run.table["group"] == ALL].iloc[0]
    attack, model = run.attack, run.record.model
    crossed_col = "step_p50" if "step_p50" in res else "flip_step"
    crossed = stats.as_float(res[crossed_col])
    l2_flip = stats.as_float(res["l2_at_flip"])
    kinds = res["group"].value_counts()
    digit_rows = (res["group"] != NOISE).to_numpy()
    start_norm = float(np.median(x0_norms[res["traj_row"].to_numpy()[digit_rows]])) if x0_norms is not None and digit_rows.any() else np.nan
    l2_median = float(np.nanmedian(l2_flip)) if np.isfinite(l2_flip).any() else np.nan
    ratio = l2_median / start_norm if start_norm and np.isfinite(start_norm) and start_norm > 0 else np.nan
    crossed_share = float(np.isfinite(crossed).mean())
    crossed_median = float(np.nanmedian(crossed)) if np.isfinite(crossed).any() else np.nan
    rms = l2_median / math.sqrt(_channels(run) * PIXELS) if np.isfinite(l2_median) else np.nan
    return {
        "answer": _answer(f"p({run.target})", crossed_share, crossed_median, l2_median, rms, ratio, start_norm),
        "method": attack.method,
        "loss": attack.loss_name,
        "lr": attack.step_size,
        "lr_is_default": attack.lr is None,
        "eps": attack.eps,
        "steps": int(np.nanmax(stats.as_float(res["steps"]))),
        "n": len(res),
        "n_noise": int(kinds.get(NOISE, 0)),
        "n_digit": int(len(res) - kinds.get(NOISE, 0)),
        "n_digit_groups": int(sum(1 for g in kinds.index if g != NOISE)),
        "seeds": attack.seeds,
        "device": run.record.device,
        "attack_seconds": run.record.attack_seconds,
        "arch": model.spec.get("arch", run.record.config.train.arch),
        "channels": _channels(run),
        "normalize": model.spec.get("normalize", run.record.config.train.normalize),
        "valid_error": model.metrics.get("valid_error"),
        "all": all_row,
        "crossed_share": crossed_share,
        "crossed_median": crossed_median,
        "l2_flip_median": l2_median,
        "rms_flip": rms,
        "start_norm": start_norm,
        "ratio": ratio,
    }


def _answer(plabel: str, share: float, median_step: float, l2: float, rms: float, ratio: float, start_norm: float) -> str:
    """The seed experiment's question answered in one or two plain sentences."""
    if share == 0:
        return f"No: {plabel} never crossed 0.5 for any start within the step budget."
    said = (
        f"{plabel} crossed 0.5 for {fmt_pct(share, 0)} of starts after a median of {fmt_step(median_step)} steps, "
        f"while the median L2 change at the flip was {fmt_num(l2)} (an RMS change of {fmt_num(rms, 3)} per pixel on the 0–1 scale"
    )
    if not np.isfinite(ratio):
        return said + "). The film strips of the run's report show what the images look like."
    said += f"; {fmt_pct(ratio, 0)} of the median digit start's own L2 norm of {fmt_num(start_norm, 1)})"
    if ratio < 0.5:
        return said + " — a change that small leaves the start in place: expect the images to still look like their start digit (see the film strips)."
    if ratio < 1.0:
        return said + " — a sizeable change: the film strips show whether the images still look like their start digit."
    return said + " — as large as the digit images themselves: the pixels were rewritten; the film strips show whether into an 8 or into scribbles."


def _model_facts(run: Run) -> list[tuple[str, str]]:
    model, train = run.record.model, run.record.config.train
    spec, metrics = model.spec, model.metrics
    facts = [
        ("architecture", str(spec.get("arch", train.arch))),
        ("input", f"{spec.get('channels', train.channels)} channel(s), normalisation {spec.get('normalize', train.normalize)}"),
        ("training", f"{metrics.get('epochs', train.epochs)} epochs, lr {train.lr}, batch {train.batch_size}, "
         f"pretrained {_yes(train.pretrained)}, fine-tune {_yes(train.fine_tune)}"),
        ("images", f"{fmt_int(metrics.get('n_train'))} training, {fmt_int(metrics.get('n_valid'))} validation"),
        ("validation error", fmt_pct(metrics.get("valid_error"), 2)),
        ("training time", f"{fmt_num(metrics.get('train_seconds'), 1)} s"),
        ("model file", f"{model.path} (sha256 {model.sha256[:12]})"),
    ]
    return facts


def _run_facts(run: Run) -> list[tuple[str, str]]:
    a, rec = run.attack, run.record
    digits = a.start_digits
    return [
        ("run", f"{run.name} ({run.path})"),
        ("created", rec.created.isoformat()),
        ("version / commit", f"{rec.version} / {rec.git_commit or 'unknown'}"),
        ("device / attack time", f"{rec.device} / {fmt_num(rec.attack_seconds, 1)} s"),
        ("starts", f"digits {', '.join(map(str, digits)) if digits else '—'}; noise {_yes(a.include_noise)} ({a.noise}); {a.seeds} seeds"),
        ("method", f"{a.method}, loss {a.loss_name}, lr {a.step_size}{' (default)' if a.lr is None else ''}, "
         f"eps {a.eps if a.eps is not None else '—'}, {a.steps} steps, record every {a.record_every}, "
         f"early stop {a.early_stop if a.early_stop is not None else 'off'}"),
        ("dataset", f"{rec.dataset.path} (sha256 {rec.dataset.sha256[:12]})"),
    ]


def _yes(flag) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def warnings_of(run: Run) -> list[dict]:
    """Artefacts worth flagging: dead-unit collapse, saturated starts, pixels outside [0, 1], starts already at target."""
    a = run.table[run.table["group"] == ALL].iloc[0]
    out = []
    plabel = f"p({run.target})"
    succ = int(a["successes"])
    out.extend(_collapse_warnings(a, run.target))
    if succ and a["grad_zero_success_share"] >= 0.5:
        zero = round(a["grad_zero_success_share"] * succ)
        out.append(
            {
                "level": "warning",
                "id": "warn-dead-units",
                "text": f"{zero} of {succ} successes ({fmt_pct(a['grad_zero_success_share'])}) end with an exactly zero input "
                "gradient. That is the signature of dead-unit collapse: a large step silenced every active unit and the "
                "logits fell back to the biases, which happen to favour the target. These flips say little about the images.",
            }
        )
    elif succ and a["grad_zero_success_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-dead-units",
                "text": f"{fmt_pct(a['grad_zero_success_share'])} of successes end with an exactly zero input gradient "
                "(possible dead-unit collapse for those starts).",
            }
        )
    failures = a["n"] - succ
    loss = run.attack.loss_name
    if failures and a["saturated_failure_share"] >= 0.5 and loss in ("l1_softmax", "?"):
        out.append(
            {
                "level": "warning",
                "id": "warn-saturated",
                "text": f"{fmt_pct(a['saturated_failure_share'])} of the failures started with {plabel} within "
                f"{stats.SATURATED_P:g} of 0 or 1: a loss on the softmax probability has a gradient proportional to p(1 - p), so these "
                "starts barely move. Relate success to the starting probability before reading it as robustness.",
            }
        )
    if a["outside_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-outside",
                "text": f"{fmt_pct(a['outside_share'])} of the final images have pixels outside [0, 1] (the method does not "
                "clamp). Images in this report are clipped to [0, 1] for display; norms use the unclipped values.",
            }
        )
    if a["start_is_target_share"] > 0:
        out.append(
            {
                "level": "note",
                "id": "note-start-target",
                "text": f"{fmt_pct(a['start_is_target_share'])} of the starts were already classified as {run.target} "
                f"({plabel} ≥ 0.5) before any step.",
            }
        )
    return out


def _collapse_warnings(a: pd.Series, target: int) -> list[dict]:
    """Dead-unit collapse measured at the final images (collapse_final): flips the image no longer causes."""
    n, succ = int(a["n"]), int(a["successes"])
    collapsed = round(a.get("collapse_share", 0.0) * n) if n else 0
    if not collapsed:
        return []
    in_success = round(a["collapse_success_share"] * succ) if succ else 0
    return [
        {
            "level": "warning" if in_success else "note",
            "id": "warn-collapse",
            "text": f"Dead-unit collapse: at the final image of {collapsed} of {n} starts every input of the detector's last "
            f"linear layer is zero, so its logits are just that layer's bias and no longer depend on the image. "
            f"{in_success} of the {succ} successes ({fmt_pct(in_success / succ if succ else float('nan'))}) were reached this way "
            f"(the bias favours {target}): those flips say nothing about what the image looks like.",
        }
    ]


def _dataset_table(run: Run) -> dict:
    manifest = run.record.dataset.manifest
    counts = manifest.get("counts") or {}
    if counts and all(str(k).isdigit() for k in counts):  # {digit: {split: n}} -> {split: {digit: n}}
        flipped: dict[str, dict] = {}
        for d, per in counts.items():
            for split, n in (per or {}).items():
                flipped.setdefault(split, {})[str(d)] = n
        counts = flipped
    known = [s for s in ("train", "valid", "pool") if s in counts]
    splits = known + [s for s in counts if s not in known]
    digits = sorted({str(d) for per in counts.values() for d in (per or {})}, key=lambda d: int(d) if d.isdigit() else 99)
    rows = [{"digit": d, "counts": [(counts[s] or {}).get(d) for s in splits]} for d in digits]
    totals = [sum(int(v) for v in (counts[s] or {}).values()) for s in splits]
    return {"splits": splits, "rows": rows, "totals": totals, "manifest": manifest}


def _figure_imgs(run: Run) -> dict[str, Img]:
    res, table, order, plabel = run.results, run.table, run.order, f"p({run.target})"
    groups = res["group"].to_numpy()
    per_group = table[table["group"] != ALL]
    p = run.p_target[res["traj_row"].to_numpy()]
    bands = stats.quantile_bands(p, groups, order)
    horizon = p.shape[1] - 1
    curves = {g: stats.survival_of(res[groups == g], horizon) for g in order}
    overall = stats.survival_of(res, horizon)
    l2_final = {g: stats.as_float(res.loc[groups == g, "l2_final"]) for g in order}
    l2_flip = {g: stats.as_float(res.loc[groups == g, "l2_at_flip"]) for g in order}
    flip = stats.as_float(res["flip_step"])
    l2f = stats.as_float(res["l2_at_flip"])
    ok = np.isfinite(flip) & np.isfinite(l2f)
    corr = float(np.corrcoef(flip[ok], l2f[ok])[0, 1]) if ok.sum() > 2 and np.std(flip[ok]) > 0 and np.std(l2f[ok]) > 0 else np.nan

    def listing(values: dict[str, str]) -> str:
        return "; ".join(f"{'noise' if g == NOISE else 'digit ' + g}: {v}" for g, v in values.items())

    return {
        "success": figure_img(
            figures.success_figure(table),
            "Bar chart of the success rate per start group with 95% bootstrap intervals. "
            + listing({r.group: f"{fmt_pct(r.success_rate)} ({fmt_pct(r.success_lo, 0)}–{fmt_pct(r.success_hi, 0)})" for r in per_group.itertuples()}),
            "Share of starts classified as the target at the last step; bars are 95% percentile-bootstrap intervals "
            "(fixed RNG); the dashed line is the rate over all starts.",
            "fig-success",
        ),
        "bands": figure_img(
            figures.p_bands_figure(bands, run.target),
            f"Small multiples, one per start group, of the median {plabel} against step with a 10–90% band. Median {plabel} "
            "at the last step: " + listing({g: fmt_prob(b[1, -1]) for g, b in bands.items()}),
            f"{plabel} of every start at every step: line = median over the group's starts, band = 10th to 90th percentile.",
            "fig-p-target",
        ),
        "survival": figure_img(
            figures.survival_figure(curves, overall),
            "Small multiples of Kaplan-Meier curves: share of starts not yet classified as the target against step. Share "
            "never flipped at the end: " + listing({g: fmt_pct(c[-1]) for g, c in curves.items()}),
            "Kaplan-Meier estimate of the share not yet flipped (argmax not yet the target); starts that never flip count "
            "as censored at their last step. Grey: all starts.",
            "fig-survival",
        ),
        "l2": figure_img(
            figures.l2_box_figure(l2_flip, l2_final),
            "Box plots per start group of the L2 change at the flip and at the end. Median final L2: "
            + listing({r.group: fmt_num(r.l2_final_median) for r in per_group.itertuples()}),
            "L2 norm of x − x0 in pixel units of [0, 1] images, summed over channels. Outlined: at the flip step "
            "(flipped starts only); filled: after the last step (all starts). Boxes span the quartiles; whiskers 1.5 IQR.",
            "fig-l2",
        ),
        "scatter": figure_img(
            figures.flip_scatter_figure(flip, l2f, groups, order),
            f"Scatter plot of the L2 change at the flip against the flip step for {int(ok.sum())} flipped starts, "
            f"coloured by start group; correlation {fmt_num(corr)}.",
            "Each point is a start that flipped; steps are jittered by up to ±0.3 so equal steps do not overlap.",
            "fig-flip-scatter",
        ),
    }


def _classifier_imgs(run: Run) -> dict[str, Img]:
    metrics, spec = run.record.model.metrics, run.record.model.spec
    out = {}
    confusion = metrics.get("confusion")
    if confusion:
        names = spec.get("class_names") or ["not_target", "target"]
        (tn, fp), (fn, tp) = confusion
        out["confusion"] = figure_img(
            figures.confusion_figure(confusion, names),
            f"Confusion matrix on the validation set: true {names[0]} predicted {names[0]} {tn}, predicted {names[1]} {fp}; "
            f"true {names[1]} predicted {names[0]} {fn}, predicted {names[1]} {tp}.",
            "Validation confusion matrix, rows = true class (counts and row shares).",
            "fig-confusion",
        )
    by_digit = metrics.get("valid_error_by_digit")
    if by_digit:
        out["digit_error"] = figure_img(
            figures.digit_error_figure(by_digit, run.target),
            "Bar chart of validation error per true digit: "
            + ", ".join(f"{d}: {fmt_pct(by_digit[d], 2)}" for d in sorted(by_digit, key=int)),
            "Validation error per true digit (for the target digit: missed targets; for the others: false alarms).",
            "fig-digit-error",
        )
    return out


def run_context(run: Run, cfg: ReportConfig | None = None) -> dict:
    """Everything the single-run template shows."""
    if cfg is not None:
        run.report = cfg
    plabel = f"p({run.target})"
    chosen = _sample_rows(run)
    most, least = _gallery_rows(run)
    anim_rows = _animation_rows(run)
    traj_rows = run.results.loc[[i for rows in chosen.values() for i in rows] + most + least + anim_rows, "traj_row"]
    step0 = int(np.flatnonzero(run.snapshot_steps == 0)[0])
    snaps, x0_norms = read_snapshots(run.path / TRAJECTORIES, traj_rows, step0)
    animations = _animations(run, anim_rows, snaps, plabel)
    return {
        "title": run.report.title,
        "run": run,
        "record": run.record,
        "plabel": plabel,
        "head": headline(run, x0_norms),
        "warnings": warnings_of(run),
        "dataset": _dataset_table(run),
        "classifier": _classifier_imgs(run),
        "table": _table_rows(run.table),
        "figs": _figure_imgs(run),
        "strips": _strips(run, chosen, snaps, plabel),
        "frames_per_strip": run.report.frames_per_strip,
        "animations": animations,
        "anim_data": [a["data"] for a in animations],
        "most": _gallery(run, most, snaps, plabel),
        "least": _gallery(run, least, snaps, plabel),
        "key": figures.diverging_stops(),
        "config_json": json.dumps(run.record.config.model_dump(mode="json"), indent=2, sort_keys=True),
        "model_facts": _model_facts(run),
        "run_facts": _run_facts(run),
        "saturated_p": f"{stats.SATURATED_P:g}",
    }


def _table_rows(table: pd.DataFrame) -> list[dict]:
    return [{k: _json_safe(v) for k, v in r.items()} for r in table.to_dict("records")]


# ---------------------------------------------------------------- comparison


def _relative_link(run: Run, out: Path) -> str | None:
    report = run.path / REPORT
    return Path(os.path.relpath(report.resolve(), out.resolve().parent)).as_posix() if report.is_file() else None


def _unique_names(runs: list[Run]) -> list[str]:
    names, seen = [], {}
    for r in runs:
        base = r.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return names


def compare_context(runs: list[Run], out: Path) -> dict:
    """Everything the comparison template shows."""
    names = _unique_names(runs)
    targets = {r.target for r in runs}
    target = runs[0].target if len(targets) == 1 else None
    plabel = f"p({target})" if target is not None else "p(target)"
    tables = {n: r.table for n, r in zip(names, runs)}
    medians, curves, l2 = {}, {}, {}
    for n, r in zip(names, runs):
        groups = r.results["group"].to_numpy()
        p = r.p_target[r.results["traj_row"].to_numpy()]
        horizon = p.shape[1] - 1
        medians[n] = {g: np.median(p[groups == g], axis=0) for g in r.order}
        curves[n] = {g: stats.survival_of(r.results[groups == g], horizon) for g in r.order}
        l2[n] = {g: stats.as_float(r.results.loc[groups == g, "l2_final"]) for g in r.order}
    rows = []
    for n, r in zip(names, runs):
        rows.append({"name": n, "run": r, "head": headline(r), "link": _relative_link(r, out), "warnings": warnings_of(r)})
    overall = "; ".join(f"{n}: {fmt_pct(t[t['group'] == ALL]['success_rate'].iloc[0])}" for n, t in tables.items())
    figs = {
        "success": figure_img(
            figures.success_compare_figure(tables),
            f"Grouped bar chart of the success rate per start group, one bar per run, with 95% bootstrap intervals. Overall: {overall}.",
            "Share of starts classified as the target at the last step, per run (95% bootstrap intervals).",
            "fig-compare-success",
        ),
        "median_p": figure_img(
            figures.median_p_compare_figure(medians, target if target is not None else 8),
            f"Small multiples per start group of the median {plabel} against step, one line per run.",
            f"Median {plabel} over each group's starts at every step, per run.",
            "fig-compare-p",
        ),
        "survival": figure_img(
            figures.survival_compare_figure(curves),
            "Small multiples per start group of Kaplan-Meier curves of the share not yet flipped, one line per run.",
            "Kaplan-Meier share of starts not yet flipped, per run (never-flipped starts censored at their last step).",
            "fig-compare-survival",
        ),
        "l2": figure_img(
            figures.l2_compare_figure(l2),
            "Box plots of the final L2 change per start group, one box per run.",
            "Final L2 of x − x0 (pixel units of [0, 1] images), per start group and run.",
            "fig-compare-l2",
        ),
    }
    return {"title": "eightgen comparison: " + ", ".join(names), "runs": rows, "figs": figs, "plabel": plabel}


# ---------------------------------------------------------------- entry points


def report_html(run_dirs: Sequence[Path] | Path, out: Path | None = None, *, report: ReportConfig | None = None) -> tuple[Path, str]:
    """The report of one run directory, or the comparison of several, and the file it belongs in."""
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise EightgenError("no run directories given")
    if len(dirs) == 1:
        target = Path(out) if out is not None else dirs[0] / REPORT
        return target, _env().get_template("run.html.j2").render(**run_context(load_run(dirs[0]), report))
    target = Path(out) if out is not None else dirs[0].resolve().parent / "compare.html"
    return target, _env().get_template("compare.html.j2").render(**compare_context([load_run(d) for d in dirs], target))


def render_report(run_dirs: Sequence[Path] | Path, out: Path | None = None, *, report: ReportConfig | None = None) -> Path:
    """Render and write the report: into the run directory (with its manifest) by default, else to `out`."""
    target, html = report_html(run_dirs, out, report=report)
    if out is None and target.name == REPORT and is_run_dir(target.parent):
        write_report(target.parent, html, {"rendered_by": "eightgen report"})
        return target
    if target.is_dir():
        raise EightgenError(f"{target} is a directory: give a file name for the report")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def digit_table(run_dir: Path) -> list[dict]:
    """Per start group summary rows (noise, digits, then "all"), JSON-safe, for a table artifact."""
    return _table_rows(load_run(run_dir).table)


def _md(text: object) -> str:
    """Text safe inside Markdown: HTML and Markdown control characters escaped."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return s


def summary_markdown(run_dir: Path) -> str:
    """The run's key numbers as Markdown, for a markdown artifact."""
    run = load_run(run_dir)
    h = headline(run)
    a = h["all"]
    plabel = f"p({run.target})"
    lines = [
        f"## {_md(run.name)}",
        "",
        f"- **method** {_md(h['method'])} (loss {_md(h['loss'])}, lr {_md(h['lr'] if h['lr'] is not None else 'default')}, "
        f"eps {_md(h['eps'] if h['eps'] is not None else '—')}), {h['steps']} steps, {h['n']:,} start{'s' if h['n'] != 1 else ''} on {_md(h['device'])}",
        f"- **model** {_md(h['arch'])}, validation error {fmt_pct(h['valid_error'], 2)}",
        f"- **success** {a['successes']:,} / {a['n']:,} = {fmt_pct(a['success_rate'])} "
        f"(95% CI {fmt_pct(a['success_lo'])}–{fmt_pct(a['success_hi'])})",
        f"- **median flip step** {fmt_step(a['flip_median'])} (flipped starts; {fmt_pct(a['censored_share'])} never flipped)",
        f"- **median L2 at flip** {fmt_num(a['l2_flip_median'])}, final {fmt_num(a['l2_final_median'])} (pixel units, [0, 1] scale)",
        f"- **{plabel} crossed 0.5** for {fmt_pct(h['crossed_share'])} of starts after a median of {fmt_step(h['crossed_median'])} steps",
    ]
    for w in warnings_of(run):
        if w["level"] == "warning":
            lines.append(f"- **warning** {_md(w['text'])}")
    return "\n".join(lines) + "\n"
