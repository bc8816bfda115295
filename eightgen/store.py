"""Storage by URL: a cache or runs folder on local disk or in an object store (fsspec), and this host's copy of it.

A folder in an object store (`s3://bucket/prefix/...`) is worked on through a mirror on local disk: readers fetch an
output's manifest, then every file it lists that the mirror lacks or holds with other content; writers finish the
output in the mirror, then publish it: the old manifest goes first, the files follow and the manifest comes last, so
a reader that checks every file against the manifest never takes a half-published output for a finished one.
Endpoint and credentials come from fsspec's usual sources (AWS_* variables, fsspec config files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from collections.abc import Callable, Collection
from typing import Annotated, Any, Union

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from upath import UPath

from eightgen.errors import EightgenError

SCRATCH_ENV = "EIGHTGEN_SCRATCH"  # where this host keeps its copies of store folders (default: a temp folder)
MANIFEST_SUFFIX = "manifest.json"  # every manifest's name ends so: published last, removed first
OPTIONAL = ("timings.json",)  # beside an output but outside its manifest: copied when there, never required


def is_url(value: object) -> bool:
    """Whether a path or string names a store folder by URL (any fsspec protocol but local files)."""
    if isinstance(value, UPath):
        return not isinstance(value, Path)
    text = str(value)
    return "://" in text and not text.startswith(("file://", "local://"))


def location(value: Any) -> Path | UPath:
    """A local Path, or a UPath for a URL: what --cache-dir, --runs-root and an artifact's path may hold."""
    if isinstance(value, UPath) and not isinstance(value, Path):
        return value
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if is_url(text):
            return UPath(text)
        return Path(text.removeprefix("file://"))
    raise ValueError(f"not a path or URL: {value!r}")


# A path field that may hold a URL: validated by `location`, written as its string (a local path as before).
Location = Annotated[
    Union[Path, UPath],
    PlainValidator(location),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "path"}),
]


def scratch_root() -> Path:
    """This host's folder for copies of store folders."""
    configured = os.environ.get(SCRATCH_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"eightgen-scratch-{os.getuid()}"


def mirror(url: UPath) -> Path:
    """Where this host keeps its copy of a store folder: <scratch>/<protocol>/<bucket and key>."""
    return scratch_root() / url.protocol / url.path.strip("/")


def local(path: Path | UPath) -> Path:
    """The local folder of a path: itself, or this host's copy of a store folder."""
    return mirror(path) if is_url(path) else Path(path)


def shown(path: Path | UPath) -> str:
    """A location as a user reads it: a URL whole, a local path absolute."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def same(a: Path | UPath, b: Path | UPath) -> bool:
    """Whether two locations name the same folder."""
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Write one file of the copy through a hidden sibling renamed over it, so a reader never sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _download(fs: Any, remote: str, tmp: Path, digest: str) -> None:
    """Download one object to tmp; ValueError when its sha256 is not `digest` (it is then never put in place)."""
    fs.get_file(remote, str(tmp))
    if _sha256(tmp) != digest:
        raise ValueError(remote)


def stored_manifest(url: UPath, manifest: str) -> tuple[bytes, dict]:
    """A store folder's manifest, read from the store itself: its bytes and its JSON (EightgenError if absent or corrupt)."""
    try:
        text = url.fs.cat_file(f"{url.path.rstrip('/')}/{manifest}")
    except FileNotFoundError:
        (mirror(url) / manifest).unlink(missing_ok=True)  # the copy must not outlive what it copies
        raise EightgenError(f"{url}: no {manifest} (not an eightgen artifact, or unfinished)") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EightgenError(f"{url}/{manifest}: corrupt JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise EightgenError(f"{url}/{manifest}: not a manifest")
    return text, parsed


def fetch(url: UPath, manifest: str, only: Collection[str] | None = None) -> Path:
    """This host's copy of a published store folder, every file checked against its manifest `manifest`; its path.

    Only files the copy lacks, or holds with other content than the manifest lists, are downloaded, and each download
    is checked too; with `only`, just those of its files (the rest is fetched by the next full fetch). A folder with no manifest in the store is not there (or not finished): EightgenError, and the
    copy's manifest is removed.
    """
    fs, root, here = url.fs, url.path.rstrip("/"), mirror(url)
    text, parsed = stored_manifest(url, manifest)
    for name, digest in parsed.get("files", {}).items():
        if only is not None and name not in only:
            continue
        target = here / name
        if target.is_file() and _sha256(target) == digest:
            continue
        try:
            _atomically(target, lambda tmp, name=name, digest=digest: _download(fs, f"{root}/{name}", tmp, digest))
        except FileNotFoundError:
            raise EightgenError(f"{url}: {name} is missing") from None
        except ValueError:
            raise EightgenError(f"{url}/{name}: sha256 differs from {manifest} (file changed or corrupt)") from None
    for name in OPTIONAL:
        try:
            _atomically(here / name, lambda tmp, name=name: fs.get_file(f"{root}/{name}", str(tmp)))
        except FileNotFoundError:
            pass
    _atomically(here / manifest, lambda tmp: tmp.write_bytes(text))  # last: the copy counts once it has its files
    return here


def publish(folder: Path, url: UPath, names: list[str] | None = None) -> None:
    """Put a finished local folder (or only `names` in it) at a store URL: manifests out first, files, manifests last.

    With `names` None the folder replaces whatever the URL held, whole: the old objects are deleted first.
    """
    fs, root = url.fs, url.path.rstrip("/")
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        for name in names:
            if name.endswith(MANIFEST_SUFFIX) and fs.exists(f"{root}/{name}"):
                fs.rm_file(f"{root}/{name}")
    manifests = [n for n in names if n.endswith(MANIFEST_SUFFIX)]
    for name in [n for n in names if n not in manifests] + manifests:
        fs.put_file(str(folder / name), f"{root}/{name}")
    fs.invalidate_cache(root)


def check_writable(url: UPath, option: str) -> None:
    """EightgenError in one line unless a small object can be written under the URL and deleted again."""
    probe = f"{url.path.rstrip('/')}/.eightgen-probe-{uuid.uuid4().hex[:12]}"
    try:
        url.fs.pipe_file(probe, b"")
        url.fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 (no bucket, no credentials, no endpoint: the same bad setting)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EightgenError(f"{option} {url}: the store refuses a write ({type(exc).__name__}: {reason})") from None


def children(url: UPath) -> list[UPath]:
    """The folders directly under a store URL (none when it does not exist)."""
    fs, root = url.fs, url.path.rstrip("/")
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [url / Path(e["name"]).name for e in entries if e.get("type") == "directory"]
