"""Content-addressed artifacts: a path plus the sha256 of what lies behind it."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

from eightgen.errors import EightgenError
from eightgen.store import Location, fetch, is_url, local, publish, stored_manifest

MANIFEST = "manifest.json"
# How long things took, beside an artifact's files but outside its manifest: the same inputs give the same hash.
TIMINGS = "timings.json"
STAGING = ("partial", "new", "old")  # the kinds of hidden sibling folders a write goes through
_LIVE_STAGING: set[Path] = set()  # the staging folders this process made and has not removed yet


class Artifact(BaseModel):
    """A stage output handed between tasks: a directory (local, or a store URL) and the sha256 of its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Location
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
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")  # one per writer: none removes another's
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
    """Read a directory's manifest, checking every listed file's sha256 (a store folder: fetched into this host's copy,
    which checks them; unverified, only the manifest is read from the store)."""
    if is_url(directory):
        if not verify:
            return stored_manifest(directory, name)[1]
        directory, verify = fetch(directory, name), False  # fetch checked every file against the manifest
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


def write_timings(directory: Path, timings: dict[str, Any]) -> None:
    """Record how long an artifact took to make (timings.json): kept out of its manifest, so never in its hash."""
    write_text_atomically(Path(directory) / TIMINGS, json.dumps(timings, indent=2, sort_keys=True) + "\n")


def read_timings(directory: Path) -> dict[str, Any]:
    """An artifact's timings, or {} when it has none (or they are unreadable: they are informative only)."""
    try:
        timings = json.loads((local(directory) / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    return timings if isinstance(timings, dict) else {}


def artifact_of(directory: Path, name: str = MANIFEST) -> Artifact:
    """The Artifact of an existing, verified artifact directory."""
    read_manifest(directory, name=name)
    return Artifact(path=directory, sha256=sha256_file(local(directory) / name))


def check_unchanged(artifact: Artifact, current_sha256: str) -> None:
    """EightgenError unless a directory's current manifest hash is the one handed over with it."""
    if current_sha256 != artifact.sha256:
        raise EightgenError(f"{artifact.path}: content changed since it was produced (sha256 differs)")


def verified(artifact: Artifact) -> Path:
    """The artifact's local directory (a store folder: this host's copy), after checking its files still match what
    was handed over."""
    check_unchanged(artifact, artifact_of(artifact.path).sha256)
    return local(artifact.path)


def fresh_sibling(final: Path, why: str) -> Path:
    """A new empty hidden directory beside `final` (created with the user's umask, unlike mkdtemp's 0700)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.parent / f".{final.name}.{why}-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            _LIVE_STAGING.add(tmp)
            return tmp
        except FileExistsError:
            continue


def remove_staging(tmp: Path) -> None:
    """Delete a staging folder this process made (whatever it holds)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _LIVE_STAGING.discard(tmp)


def abandon_staging() -> list[Path]:
    """Delete every staging folder this process made and has not finished: for a command stopped halfway."""
    left = [p for p in list(_LIVE_STAGING) if p.exists()]
    for p in left:
        remove_staging(p)
    _LIVE_STAGING.clear()
    return left


def clear_leftovers(final: Path) -> list[Path]:
    """Delete the staging folders a killed writer left beside `final`; only for a caller that holds final's lock."""
    final = local(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:{'|'.join(STAGING)})-[0-9a-f]{{12}}")
    found = [p for p in final.parent.glob(f".{final.name}.*") if pattern.fullmatch(p.name)] if final.parent.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


@functools.cache
def _renameat2() -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOENT, errno.ENOTDIR, errno.EPERM):
        return False  # unsupported here, or one side is gone: the caller falls back to renames
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, final: Path, tries: int = 100) -> None:
    """Put a finished directory at `final`; an old one there is swapped out whole and deleted after, never mixed in.

    Where the system allows, the old and new directories trade places in one step, so `final` never goes missing
    for a reader. Another writer swapping in the same `final` at the same moment never makes this fail: the
    last rename wins (the stage tasks lock each output, so in a run that only happens to identical content).
    """
    aside: list[Path] = []
    try:
        for _ in range(tries):
            if final.is_dir() and not final.is_symlink() and _exchange(new, final):
                aside.append(new)  # `new` now holds the old directory
                return
            if final.exists() or final.is_symlink():
                old = fresh_sibling(final, "old")
                aside.append(old)
                try:
                    os.rename(final, old / final.name)
                except FileNotFoundError:
                    pass  # another writer moved it away first
            try:
                os.rename(new, final)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                # another writer's directory landed there after the old one was moved aside: again
        raise OSError(errno.EBUSY, f"{final}: other writers kept replacing it; gave up after {tries} tries")
    finally:
        for old in aside:
            remove_staging(old)


def put_in_place(new: Path, final: Path) -> None:
    """swap_in a finished directory at `final`; at a store URL, into this host's copy, then published from there."""
    swap_in(new, local(final))
    if is_url(final):
        publish(local(final), final)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh sibling directory to write into, put in place at `final` only when the block succeeds."""
    tmp = fresh_sibling(local(final), "partial")
    try:
        yield tmp
        put_in_place(tmp, final)
    finally:
        remove_staging(tmp)
