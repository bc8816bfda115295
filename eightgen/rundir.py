"""The run directory: its file names, the typed record in config.json, and the only code that writes or reads them."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Collection
from typing import Any, Sequence

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from eightgen.artifacts import (
    MANIFEST,
    Artifact,
    artifact_of,
    fresh_sibling,
    put_in_place,
    read_manifest,
    remove_staging,
    write_manifest,
    write_text_atomically,
)
from eightgen.config import ExperimentConfig
from eightgen.errors import EightgenError
from eightgen.store import Location, children, fetch, is_url, local, location, mirror, publish
from eightgen.trajectory import Shards

CONFIG = "config.json"
RESULTS = "results.parquet"
RESULTS_CSV = "results.csv"
TRAJECTORIES = "trajectories"  # folder of trajectory shards, one per optimisation chunk, in start order
LEGACY_TRAJECTORIES = "trajectories.npz"  # one file for every start (runs written before the shards)
REPORT = "report.html"
REPORT_MANIFEST = "report.manifest.json"
RUN_FILES = (RESULTS, RESULTS_CSV, CONFIG)
# The settings that decide a run's numbers; where it is written (runs_root, cache_dir, run_name) does not.
SETTINGS = ("dataset", "train", "attack", "report")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetRecord(_Record):
    """The assembled dataset a run used: where it was, its content hash, and its manifest (counts, source)."""

    path: Location
    sha256: str
    manifest: dict[str, Any]

    def artifact(self) -> Artifact:
        """The dataset as a stage input."""
        return Artifact(path=self.path, sha256=self.sha256)


class ModelRecord(_Record):
    """The trained detector a run used: where it was, its content hash, its spec and validation metrics."""

    path: Location
    sha256: str
    spec: dict[str, Any]
    metrics: dict[str, Any]

    def artifact(self) -> Artifact:
        """The model as a stage input."""
        return Artifact(path=self.path, sha256=self.sha256)


class RefereeRecord(_Record):
    """The referees that judged a run's images (aligned experiment)."""

    path: Location
    sha256: str
    info: dict[str, Any]


class AlignedRecord(_Record):
    """Where a judged run sits in the aligned experiment."""

    experiment: str
    detector: str
    budget: float
    matched_budget: float


class RunRecord(_Record):
    """config.json: the settings, inputs, device and timings that produced a run directory's results."""

    run_name: str
    created: datetime
    version: str
    git_commit: str | None = None
    config: ExperimentConfig
    dataset: DatasetRecord
    model: ModelRecord
    device: str = "cpu"
    attack_seconds: float = 0.0
    referees: RefereeRecord | None = None
    aligned: AlignedRecord | None = None

    @property
    def target(self) -> int:
        """The target class of the run."""
        return self.config.dataset.target


def now() -> datetime:
    """The current UTC time to the second, as records store it."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def settings_of(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide a run's numbers, as JSON."""
    return cfg.model_dump(mode="json", include=set(SETTINGS))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def settings_diff(held: ExperimentConfig, asked: ExperimentConfig) -> list[str]:
    """'field: held -> asked' for every setting that differs between two configs (dotted field names)."""
    a, b = _flat(settings_of(held)), _flat(settings_of(asked))
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} asked" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_record(run_dir: Path) -> RunRecord:
    """The typed record of a run directory, or EightgenError naming what is wrong with its config.json."""
    path = location(run_dir) / CONFIG
    try:
        return RunRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise EightgenError(f"{run_dir}: no {CONFIG} (not a run directory?)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise EightgenError(f"{path}: not a valid run record ({where}: {first['msg']})") from None


def verify_run(run_dir: Path) -> Artifact:
    """The run directory's Artifact after checking every file against its manifest (EightgenError naming a damaged one)."""
    manifest = read_manifest(location(run_dir))
    missing = [f for f in RUN_FILES if f not in manifest.get("files", {})]
    if not _shard_names(manifest):
        missing.append(f"{TRAJECTORIES}/")
    if missing:
        raise EightgenError(f"{run_dir}/{MANIFEST}: does not list {', '.join(missing)}")
    return artifact_of(location(run_dir))


def shard_name(i: int) -> str:
    """The manifest name of a run's i-th trajectory shard."""
    return f"{TRAJECTORIES}/part-{i:05d}.npz"


def _shard_names(manifest: dict[str, Any]) -> list[str]:
    files = manifest.get("files", {})
    shards = sorted(f for f in files if f.startswith(TRAJECTORIES + "/"))
    return shards or ([LEGACY_TRAJECTORIES] if LEGACY_TRAJECTORIES in files else [])


def trajectories(run_dir: Path) -> Shards:
    """A run's trajectories, read lazily from the shards its manifest lists (the manifest not verified here)."""
    run_dir = Path(run_dir)
    names = _shard_names(read_manifest(run_dir, verify=False))
    if not names:
        raise EightgenError(f"{run_dir}/{MANIFEST}: lists no trajectories")
    return Shards([run_dir / n for n in names])


def is_run_dir(path: Path) -> bool:
    """Whether a folder holds a run (a config.json and a manifest)."""
    return (location(path) / CONFIG).is_file() and (location(path) / MANIFEST).is_file()


def local_runs(runs_root: Path, manifests: Sequence[str] = (MANIFEST, REPORT_MANIFEST), only: Collection[str] | None = None) -> Path:
    """A runs folder to read here: itself, or this host's copy of what a store's runs folder publishes (each folder
    with every one of `manifests` it has, or only the files named in `only`; copies of folders no longer there are
    dropped)."""
    if not is_url(runs_root):
        return Path(runs_root)
    here = mirror(runs_root)
    kept = set()
    for run in children(runs_root):
        for name in manifests:
            try:
                fetch(run, name, only)
                kept.add(run.name)
            except EightgenError:
                pass  # not this kind of output, or not finished
    for old in here.iterdir() if here.is_dir() else []:
        if old.is_dir() and old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    here.mkdir(parents=True, exist_ok=True)
    return here


def local_run(run_dir: Path) -> Path:
    """A run directory to read here: itself, or this host's copy of a run in a store, brought up to date."""
    return fetch(run_dir, MANIFEST) if is_url(run_dir) else Path(run_dir)


def check_target(run_dir: Path, cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Refuse a run directory that holds results of other settings, or files that are not a run, unless overwriting."""
    run_dir = location(run_dir)
    if overwrite or not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise EightgenError(f"{run_dir} is a file, not a run directory: choose another --run-name or --runs-root")
    if not any(run_dir.iterdir()):
        return
    ways_out = "choose another --run-name, or pass --overwrite to replace that run (results, trajectories, config and report)"
    try:
        held = load_record(run_dir).config
    except EightgenError as exc:
        raise EightgenError(f"{run_dir} holds files that are not a readable run ({exc}); {ways_out}") from None
    diff = settings_diff(held, cfg)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise EightgenError(f"{run_dir} holds a run of other settings ({shown}); {ways_out}")


def write_run(
    run_dir: Path, record: RunRecord, results: pd.DataFrame, shards: Sequence[Path], stamp: dict[str, Any] | None = None
) -> Artifact:
    """Write a whole run directory (results, trajectory shards copied from `shards`, record, manifest) and swap it in
    for any old one at once (at a store URL: written here, then published)."""
    tmp = fresh_sibling(local(run_dir), "new")
    try:
        results.to_parquet(tmp / RESULTS, index=False)
        results.to_csv(tmp / RESULTS_CSV, index=False)
        (tmp / TRAJECTORIES).mkdir()
        names = [shard_name(i) for i in range(len(shards))]
        for source, name in zip(shards, names):
            shutil.copyfile(source, tmp / name)  # a copy: the run stays whole when the cache is cleaned
        if Shards([tmp / n for n in names]).n != len(results):
            raise EightgenError(f"{run_dir}: the trajectory shards do not hold one row per result ({len(results)})")
        (tmp / CONFIG).write_text(record.model_dump_json(indent=2))
        write_manifest(tmp, {"run_name": record.run_name, **(stamp or {})}, [*RUN_FILES, *names])
        put_in_place(tmp, run_dir)
    finally:
        remove_staging(tmp)
    return artifact_of(run_dir)


def write_report(run_dir: Path, html: str, stamp: dict[str, Any]) -> Artifact:
    """Write report.html into a run directory (atomically) with its own manifest; return that manifest's Artifact.

    A run in a store gets them written into this host's copy, then published (the report's manifest last)."""
    here = local(run_dir)
    write_text_atomically(here / REPORT, html)
    write_manifest(here, stamp, [REPORT], name=REPORT_MANIFEST)
    if is_url(run_dir):
        publish(here, run_dir, [REPORT, REPORT_MANIFEST])
    return artifact_of(run_dir, name=REPORT_MANIFEST)


def find_run(runs_root: Path, name: str = "") -> Path:
    """A run directory by name (or path) under runs_root; the newest run there when name is empty."""
    runs_root = location(runs_root)
    if name:
        path = location(name) if is_url(name) or Path(name).is_absolute() else runs_root / name
        if not is_run_dir(path):
            raise EightgenError(f"no run named {name!r} in {runs_root} (no {path / CONFIG})")
        return path
    runs = [p for p in runs_root.iterdir() if p.is_dir() and is_run_dir(p)] if runs_root.is_dir() else []
    if not runs:
        raise EightgenError(f"no runs in {runs_root}: run the pipeline first, or name a run")
    return max(runs, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))


def git_commit() -> str | None:
    """The source checkout's commit, if it is a git checkout."""
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

