"""The code part of a cache key, computed: a module's project imports, transitively, and the package data they read."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PROJECT_PACKAGES = ("eightgen", "tasks", "flows", "reports", "cli", "runtime", "prefect_api", "benchmarks")
ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module under root (a package's __init__.py), or None if there is none."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    """A module and the packages that contain it: importing a.b.c runs a, a.b and a.b.c."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imports(source: str, name: str, is_package: bool) -> set[str]:
    """Project modules a module's source imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES}


def code_files(module: str, root: Path = ROOT) -> list[Path]:
    """Every file the module's code can read: its transitive project imports and their packages' data files."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = _parents(module)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue  # `from pkg import function` names no module
        files.add(path)
        for imported in _imports(path.read_text(), name, path.name == "__init__.py"):
            todo += _parents(imported)
    for package in {p.parent for p in files}:
        files.update(_package_data(package))
    return sorted(files)


def _package_data(package: Path) -> list[Path]:
    """The non-Python files a package ships (templates and the like), below its folder."""
    return [
        p
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts and not p.name.startswith(".")
        and (p.parent == package or not (p.parent / "__init__.py").exists())
    ]


# (module, root) -> (closure files, their mtimes, digest): a key is asked for twice per task call, per chunk.
_DIGESTS: dict[tuple[str, Path], tuple[tuple[Path, ...], tuple[int, ...], str]] = {}


def _stamps(files: tuple[Path, ...]) -> tuple[int, ...]:
    return tuple(p.stat().st_mtime_ns if p.exists() else -1 for p in files)


def code_digest(module: str, root: Path = ROOT) -> str:
    """Hex sha256 of the code a module runs: every file of its closure, by path relative to root and content.

    Remembered until one of the closure's files changes (an edit may also add an import).
    """
    cached = _DIGESTS.get((module, root))
    if cached is not None and _stamps(cached[0]) == cached[1]:
        return cached[2]
    files = tuple(code_files(module, root))
    stamps = _stamps(files)
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    _DIGESTS[(module, root)] = (files, stamps, h.hexdigest())
    return h.hexdigest()
