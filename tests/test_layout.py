"""The layout shows the architecture: which package and which part of the core may import which, no import cycles,
flows/ holds only flows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from eightgen.codekey import PROJECT_PACKAGES, _imports, module_file

ROOT = Path(__file__).resolve().parents[1]
# package -> project packages it may import (anywhere in its modules, lazily or not)
ALLOWED = {
    "eightgen": {"eightgen"},
    "tasks": {"eightgen", "tasks", "reports", "runtime"},
    "reports": {"eightgen", "reports"},
    "flows": {"eightgen", "tasks", "flows", "runtime", "prefect_api"},
    "runtime": {"eightgen", "runtime", "prefect_api"},
    "prefect_api": {"eightgen", "prefect_api"},
    "cli": {"eightgen", "cli", "flows", "reports", "runtime", "prefect_api"},
    "benchmarks": {"eightgen", "benchmarks", "cli", "flows", "runtime", "prefect_api", "tasks"},
}
# The core's parts, in pipeline order -> the parts each may import. "top" is eightgen's own modules: configuration,
# errors and the on-disk stores every part shares.
CORE = {
    "top": {"top"},
    "data": {"top", "data"},
    "models": {"top", "data", "models"},
    "attack": {"top", "data", "attack"},
    "diffusion": {"top", "data", "models", "diffusion"},
    "judge": {"top", "data", "models", "diffusion", "judge"},
}


def core_part(name: str) -> str:
    """The part of the core a module of eightgen belongs to: its sub-package, or "top"."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in CORE) else "top"


def modules() -> dict[str, Path]:
    """Every project module by dotted name."""
    found = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it)."""
    mods = modules()
    return {
        name: {m for m in _imports(path.read_text(), name, path.name == "__init__.py") if m in mods and m != name}
        for name, path in mods.items()
    }


def test_packages_import_only_what_the_architecture_allows() -> None:
    wrong = sorted(
        f"{name} imports {other}" for name, deps in graph().items() for other in deps
        if other.split(".")[0] not in ALLOWED[name.split(".")[0]]
    )
    assert wrong == []


def test_the_core_parts_import_only_earlier_parts_of_the_pipeline() -> None:
    wrong = sorted(
        f"{name} imports {other}" for name, deps in graph().items() if name.startswith("eightgen")
        for other in deps if other.startswith("eightgen") and core_part(other) not in CORE[core_part(name)]
    )
    assert wrong == []


def test_every_core_sub_package_has_its_rule() -> None:
    packages = {p.parent.name for p in (ROOT / "eightgen").glob("*/__init__.py")}
    assert packages == set(CORE) - {"top"}


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_core_library_never_imports_prefect_jinja_or_matplotlib() -> None:
    for name, path in modules().items():
        if name.split(".")[0] != "eightgen":
            continue
        imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"prefect", "jinja2", "matplotlib"}, name


@pytest.mark.parametrize("name", [n for n in modules() if n.startswith("flows.") and n != "flows"])
def test_every_module_in_flows_defines_flows(name: str) -> None:
    tree = ast.parse(module_file(name, ROOT).read_text())
    decorated = [
        f.name for f in tree.body if isinstance(f, ast.FunctionDef)
        and any("flow" in ast.unparse(d).split("(")[0] for d in f.decorator_list)
    ]
    assert decorated, f"{name} defines no Prefect flow"


def test_no_report_module_is_much_over_four_hundred_lines() -> None:
    long = {name: n for name, path in modules().items() if name.startswith("reports") and (n := len(path.read_text().splitlines())) > 420}
    assert long == {}
