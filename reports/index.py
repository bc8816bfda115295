"""The runs index: one entry per run and experiment in a runs folder, with its headline share, read from its own files.

Plain runs are read through the run-directory record and results; aligned and diffusion experiments through the JSON
summaries their reports wrote. Only the files read are checked against their manifest (not the trajectories), so a
scan stays fast; a directory that cannot be read becomes an "unreadable" entry with a one-line reason.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from eightgen.artifacts import MANIFEST, read_manifest, sha256_file
from eightgen.classes import CLASS_SETS
from eightgen.errors import EightgenError
from eightgen.rundir import CONFIG, REPORT, RESULTS, load_record
from reports import stats
from reports.files import ALIGNED_HTML, ALIGNED_JSON, ALIGNED_MANIFEST, DIFFUSION_HTML, DIFFUSION_JSON
from reports.history import Share, UTCTime, Version

# The experiments' files, as tasks.aligned and tasks.threeways write them (reports.aligned / reports.diffusion name
# the JSON and HTML; importing those would load matplotlib for a listing).
Kind = Literal["run", "aligned", "diffusion", "unreadable"]


class Entry(BaseModel):
    """One line of the index: a run or an experiment, what it was, its headline share and where its report is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    kind: Kind
    dataset: str | None = None
    target: str | None = None
    method: str | None = None
    starts: int | None = None
    headline: str | None = None  # what the share is
    share: Share | None = None
    flip_median: float | None = None
    when: UTCTime
    report: str | None = None  # relative to the runs folder, when the report exists
    version: str | None = None  # sha256 of the manifest read
    model_sha256: str | None = None
    dataset_sha256: str | None = None
    git_commit: str | None = None
    reason: str | None = None  # why it is unreadable

    @property
    def comparable(self) -> bool:
        """Whether `eightgen report` can put it beside other runs (plain runs only)."""
        return self.kind == "run"

    def as_version(self) -> Version | None:
        """The history line of this entry (None when unreadable)."""
        if self.kind == "unreadable" or self.version is None or self.headline is None:
            return None
        return Version(**self.model_dump(include=set(Version.model_fields)))


def _share(d: dict[str, Any]) -> Share:
    """A stored share (share or value, lo, hi, k, n) as a Share, its interval recomputed from k and n."""
    k, n = int(d["k"]), int(d["n"])
    if not 0 <= k <= n or n == 0:
        raise EightgenError(f"share {k} of {n} is not a share")
    return Share(**stats.counted_share(k, n))


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(microsecond=0)


def _checked(directory: Path, manifest_name: str, files: tuple[str, ...]) -> str:
    """The manifest's sha256 after checking the files read against it (EightgenError naming a missing or changed one)."""
    listed = read_manifest(directory, verify=False, name=manifest_name).get("files", {})
    for f in files:
        if f not in listed:
            raise EightgenError(f"{manifest_name} does not list {f}")
        if not (directory / f).is_file():
            raise EightgenError(f"{f} is missing")
        if sha256_file(directory / f) != listed[f]:
            raise EightgenError(f"{f}: sha256 differs from {manifest_name} (changed or corrupt)")
    return sha256_file(directory / manifest_name)


def _report(directory: Path, root: Path, page: str) -> str | None:
    return (directory / page).relative_to(root).as_posix() if (directory / page).is_file() else None


def _title(dataset: str | None) -> str | None:
    return CLASS_SETS[dataset].title if dataset in CLASS_SETS else dataset


def plain_entry(run_dir: Path, root: Path) -> Entry:
    """A pipeline run: the share of starts the detector ends up calling the target, and the median flip step."""
    record = load_record(run_dir)
    version = _checked(run_dir, MANIFEST, (CONFIG, RESULTS))
    try:
        results = pd.read_parquet(run_dir / RESULTS, columns=["success", "flip_step"])
    except (OSError, ValueError, KeyError) as exc:
        raise EightgenError(f"{RESULTS}: unreadable ({type(exc).__name__})") from None
    if results.empty:
        raise EightgenError(f"{RESULTS}: no rows")
    flip = stats.as_float(results["flip_step"])
    classes = record.config.dataset.classes
    target = classes.name_of(record.target)
    return Entry(
        name=run_dir.name, kind="run", dataset=classes.title, target=target, method=record.config.attack.method,
        starts=len(results), headline=f"success: share of starts the detector ends up calling {target}",
        share=_share(stats.share_ci(results["success"])),
        flip_median=float(np.nanmedian(flip)) if np.isfinite(flip).any() else None,
        when=record.created, report=_report(run_dir, root, REPORT), version=version,
        model_sha256=record.model.sha256, dataset_sha256=record.dataset.sha256, git_commit=record.git_commit,
    )


def _robust_cell(summary: dict) -> dict:
    """The matched-budget cell of the robust detector (in a sweep without one named so: the largest radius)."""
    b = summary["matched_budget"]
    cells = [c for c in summary["cells"] if c["budget"] == b and c.get("digits")]
    named = [c for c in cells if c["detector"] == "robust"]
    if named or cells:
        return named[0] if named else max(cells, key=lambda c: c.get("radius", 0.0))
    raise EightgenError(f"{ALIGNED_JSON}: no robust detector at the matched budget {b:g}")


def aligned_entry(directory: Path, root: Path) -> Entry:
    """An aligned experiment: the k-NN target share of the robust detector's results at the matched budget (digit starts)."""
    version = _checked(directory, ALIGNED_MANIFEST, (ALIGNED_JSON,))
    summary = json.loads((directory / ALIGNED_JSON).read_text())
    cell = _robust_cell(summary)
    stored = next((t for t in summary.get("targets", []) if t.get("key") == "knn_robust"), None)
    share = _share(stored if stored is not None else cell["digits"]["referees"]["knn"])
    sub = directory / cell["run"]
    record = load_record(sub) if (sub / CONFIG).is_file() else None
    target = summary["target_name"]
    return Entry(
        name=directory.name, kind="aligned", dataset=_title(summary.get("dataset")), target=target,
        method=record.config.attack.method if record else None,
        starts=sum(int(cell[k]["n"]) for k in ("digits", "noise") if cell.get(k)),
        headline=f"k-NN {target} share of the {cell['detector']} detector's results at L2 budget {summary['matched_budget']:g} (digit starts)",
        share=share, when=_mtime(directory / ALIGNED_MANIFEST), report=_report(directory, root, ALIGNED_HTML), version=version,
        model_sha256=record.model.sha256 if record else None, dataset_sha256=record.dataset.sha256 if record else None,
        git_commit=record.git_commit if record else None,
    )


def diffusion_entry(directory: Path, root: Path) -> Entry:
    """A diffusion experiment: the ten-class k-NN target share of robust-guided diffusion from noise."""
    version = _checked(directory, MANIFEST, (DIFFUSION_JSON,))
    summary = json.loads((directory / DIFFUSION_JSON).read_text())
    cells = [c for c in summary["cells"] if c["path"] == "diffusion-robust"]
    noise = next((c for c in cells if c["kind"] == "noise"), None)
    if noise is None:
        raise EightgenError(f"{DIFFUSION_JSON}: no robust-guided diffusion from noise")
    target, facts = summary["target_name"], summary.get("facts", {})
    # diffusion.json names the target class, not the dataset: the class names tell the datasets apart.
    dataset = _title(summary.get("dataset")) or next((c.title for c in CLASS_SETS.values() if c.name_of(summary["target"]) == target), None)
    steps = facts.get("ddim_steps")
    return Entry(
        name=directory.name, kind="diffusion", dataset=dataset, target=target,
        method="robust-guided diffusion" + (f", {steps} DDIM steps" if steps else ""),
        starts=sum(int(c["n"]) for c in cells),
        headline=f"k-NN (ten classes) {target} share of robust-guided diffusion from noise",
        share=_share(noise["knn10"]), when=_mtime(directory / MANIFEST), report=_report(directory, root, DIFFUSION_HTML),
        version=version, model_sha256=facts.get("detectors", {}).get("robust"), dataset_sha256=facts.get("dataset"),
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, EightgenError) else text


def entry(directory: Path, root: Path) -> Entry:
    """The index entry of one folder in the runs folder; an unreadable one with the reason when it cannot be read."""
    try:
        if (directory / ALIGNED_JSON).exists() or (directory / ALIGNED_MANIFEST).exists():
            return aligned_entry(directory, root)
        if (directory / DIFFUSION_JSON).exists():
            return diffusion_entry(directory, root)
        if (directory / CONFIG).exists() or (directory / MANIFEST).exists():
            return plain_entry(directory, root)
        reason = f"no {CONFIG}, {ALIGNED_JSON} or {DIFFUSION_JSON} (not a run, or not finished)"
    except Exception as exc:  # noqa: BLE001  the index lists what it cannot read, and never stops at it
        reason = _reason(exc)
    try:
        when = _mtime(directory)
    except OSError:
        when = datetime.fromtimestamp(0, timezone.utc)
    return Entry(name=directory.name, kind="unreadable", when=when, reason=reason)


def scan(root: Path) -> list[Entry]:
    """Every run and experiment in a runs folder, newest first (EightgenError when there is no such folder)."""
    root = Path(root)
    if not root.is_dir():
        raise EightgenError(f"no runs folder at {root}" + (" (a file)" if root.exists() else ""))
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries = [entry(p, root) for p in folders]
    return sorted(entries, key=lambda e: (e.when, e.name), reverse=True)


def as_json(entries: list[Entry]) -> str:
    """The entries as a JSON list (what `eightgen runs --json` prints)."""
    return json.dumps([e.model_dump(mode="json") | {"comparable": e.comparable} for e in entries], indent=2)
