"""index-history.jsonl at the root of a runs folder: one JSON line per finished version of a run, appended under a lock.

A run's directory name is a hash of its settings, so a nightly deployment rewrites the same directory; this file is
what remembers the earlier versions (other code or data), so the index can show their headline numbers over time.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

HISTORY = "index-history.jsonl"


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


# A time without a zone is read as UTC, so every time sorts against every other.
UTCTime = Annotated[datetime, AfterValidator(_utc)]


class Share(BaseModel):
    """A share k of n with its exact 95% interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    share: float
    lo: float
    hi: float
    k: int
    n: int


class Version(BaseModel):
    """One finished version of a run or experiment: what identifies it, and its headline numbers."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # lines from later versions of eightgen may hold more
    name: str
    kind: str
    when: UTCTime
    version: str  # sha256 of the directory's manifest: which output this is
    model_sha256: str | None = None
    dataset_sha256: str | None = None
    git_commit: str | None = None
    headline: str
    share: Share | None = None
    flip_median: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What makes a version the same: its name and manifest hash."""
        return (self.name, self.version)


@dataclass(frozen=True)
class BadLine:
    """A history line that could not be read, and why."""

    line: int
    reason: str


def parse(lines: Iterable[str]) -> tuple[list[Version], list[BadLine]]:
    """The versions of a history file's lines, and the lines that are not versions (blank lines skipped)."""
    versions, bad = [], []
    for i, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            versions.append(Version.model_validate_json(text))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            bad.append(BadLine(i, f"{where}: {first['msg']}"))
    return versions, bad


def read_history(root: Path) -> tuple[list[Version], list[BadLine]]:
    """The versions recorded under a runs folder (none when it has no history yet), and its unreadable lines."""
    try:
        text = (Path(root) / HISTORY).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    return parse(text.splitlines())


@contextmanager
def locked(root: Path) -> Iterator[IO[str]]:
    """The history file opened for appending and held under an exclusive lock: one writer at a time, across processes."""
    with open(Path(root) / HISTORY, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_new(f: IO[str], versions: Iterable[Version]) -> list[Version]:
    """Append to a locked history file the versions it does not hold yet, one JSON line per write; return them."""
    f.seek(0)
    held = f.read()
    known = {v.key for v in parse(held.splitlines())[0]}
    added = []
    for v in versions:
        if v.key in known:
            continue
        if held and not held.endswith("\n"):  # a writer killed mid-line: end its line, so ours stays whole
            f.write("\n")
            held = "\n"
        f.write(json.dumps(v.model_dump(mode="json"), sort_keys=True) + "\n")
        f.flush()
        known.add(v.key)
        added.append(v)
    if added:
        os.fsync(f.fileno())
    return added


def trends(versions: Iterable[Version]) -> dict[str, list[Version]]:
    """Per name with at least two distinct versions, its versions oldest first."""
    by_name: dict[str, dict[str, Version]] = {}
    for v in versions:
        by_name.setdefault(v.name, {}).setdefault(v.version, v)
    return {n: sorted(vs.values(), key=lambda v: v.when) for n, vs in sorted(by_name.items()) if len(vs) >= 2}
