"""Content-addressed artifacts: a path plus the sha256 of what lies behind it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def write_manifest(directory: Path, meta: dict, files: list[str]) -> Artifact:
    """Write manifest.json (meta + sha256 of each file) into directory; return its Artifact."""
    manifest = dict(meta, files={name: sha256_file(directory / name) for name in files})
    target = directory / MANIFEST
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    tmp.replace(target)
    return Artifact(path=directory, sha256=sha256_file(target))


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """Read a directory's manifest.json, checking every listed file's sha256."""
    target = directory / MANIFEST
    if not target.is_file():
        raise EightgenError(f"{directory}: no {MANIFEST} (not an eightgen artifact, or unfinished)")
    try:
        manifest = json.loads(target.read_text())
    except json.JSONDecodeError as exc:
        raise EightgenError(f"{target}: corrupt JSON ({exc})") from None
    if verify:
        for name, digest in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                raise EightgenError(f"{directory}: {name} is missing")
            if sha256_file(path) != digest:
                raise EightgenError(f"{path}: sha256 differs from {MANIFEST} (file changed or corrupt)")
    return manifest


def artifact_of(directory: Path) -> Artifact:
    """The Artifact of an existing, verified artifact directory."""
    read_manifest(directory)
    return Artifact(path=directory, sha256=sha256_file(directory / MANIFEST))
