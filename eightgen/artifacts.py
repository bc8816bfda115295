"""Content-addressed artifacts: a path plus the sha256 of what lies behind it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict

from eightgen.errors import EightgenError

MANIFEST = "manifest.json"


class Artifact(BaseModel):
    """A stage output handed between tasks: a directory and the sha256 of its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """Hex sha256 of an object's canonical JSON form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_text_atomically(target: Path, text: str) -> None:
    """Write a text file through a hidden sibling renamed over it, so readers never see half of it."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _put_manifest(directory: Path, manifest: dict, name: str) -> Artifact:
    target = directory / name
    write_text_atomically(target, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return Artifact(path=directory, sha256=sha256_file(target))


def write_manifest(directory: Path, meta: dict, files: list[str], name: str = MANIFEST) -> Artifact:
    """Write a manifest (meta + sha256 of each file) into directory; return its Artifact."""
    return _put_manifest(directory, dict(meta, files={f: sha256_file(directory / f) for f in files}), name)


def stamp_manifest(directory: Path, fields: dict, name: str = MANIFEST) -> Artifact:
    """Add fields to a directory's verified manifest (its files unchanged); return the new Artifact."""
    return _put_manifest(directory, dict(read_manifest(directory, name=name), **fields), name)


def read_manifest(directory: Path, verify: bool = True, name: str = MANIFEST) -> dict:
    """Read a directory's manifest, checking every listed file's sha256."""
    target = directory / name
    if not target.is_file():
        raise EightgenError(f"{directory}: no {name} (not an eightgen artifact, or unfinished)")
    try:
        manifest = json.loads(target.read_text())
    except json.JSONDecodeError as exc:
        raise EightgenError(f"{target}: corrupt JSON ({exc})") from None
    if verify:
        for file, digest in manifest.get("files", {}).items():
            path = directory / file
            if not path.is_file():
                raise EightgenError(f"{directory}: {file} is missing")
            if sha256_file(path) != digest:
                raise EightgenError(f"{path}: sha256 differs from {name} (file changed or corrupt)")
    return manifest


def artifact_of(directory: Path, name: str = MANIFEST) -> Artifact:
    """The Artifact of an existing, verified artifact directory."""
    read_manifest(directory, name=name)
    return Artifact(path=directory, sha256=sha256_file(directory / name))


def check_unchanged(artifact: Artifact, current_sha256: str) -> None:
    """EightgenError unless a directory's current manifest hash is the one handed over with it."""
    if current_sha256 != artifact.sha256:
        raise EightgenError(f"{artifact.path}: content changed since it was produced (sha256 differs)")


def verified(artifact: Artifact) -> Path:
    """The artifact's directory, after checking its files still match what was handed over."""
    check_unchanged(artifact, artifact_of(artifact.path).sha256)
    return artifact.path


def fresh_sibling(final: Path, why: str) -> Path:
    """A new empty hidden directory beside `final` (created with the user's umask, unlike mkdtemp's 0700)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.parent / f".{final.name}.{why}-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def swap_in(new: Path, final: Path) -> None:
    """Put a finished directory at `final`; an old one there is moved aside first and deleted after, never mixed in."""
    old = None
    if final.exists():
        old = fresh_sibling(final, "old")
        os.rename(final, old / final.name)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh sibling directory to write into, renamed to `final` only when the block succeeds."""
    tmp = fresh_sibling(final, "partial")
    try:
        yield tmp
        swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
