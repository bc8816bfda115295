"""The code part of every stage key is computed from the modules the stage imports, so edits re-run exactly what they touch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eightgen.codekey import PROJECT_PACKAGES, code_digest, code_files

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "tasks.assemble", "tasks.train", "tasks.attack", "tasks.collect", "tasks.report", "tasks.referees", "tasks.judge", "tasks.aligned",
    "tasks.denoise", "tasks.sanity", "tasks.threeways",
)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the project's packages, to edit."""
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digests(root: Path) -> dict[str, str]:
    return {stage: code_digest(stage, root) for stage in STAGES}


def changed_after(root: Path, edit: str, text: str = "\n# edited\n") -> set[str]:
    """The stages whose code key changes when `text` is appended to the file `edit` (relative to root)."""
    before = digests(root)
    with open(root / edit, "a") as f:
        f.write(text)
    after = digests(root)
    return {s for s in STAGES if before[s] != after[s]}


def test_the_optimisation_engine_keys_the_chunks_but_not_the_report(checkout: Path) -> None:
    # collecting re-runs too when the chunks change, through their content hashes
    assert changed_after(checkout, "eightgen/attack/execution.py") == {"tasks.attack"}
    assert changed_after(checkout, "eightgen/attack/metrics.py") == {"tasks.collect", "tasks.judge"}


def test_a_template_or_report_module_keys_only_the_reports(checkout: Path) -> None:
    reporting = {"tasks.report", "tasks.aligned", "tasks.threeways"}
    assert changed_after(checkout, "reports/templates/run.html.j2", "{# edited #}\n") == reporting
    assert changed_after(checkout, "reports/figures.py") == reporting
    # the three-ways stage reads the aligned runs through reports.aligned
    assert changed_after(checkout, "reports/aligned.py") == {"tasks.aligned", "tasks.threeways"}
    assert changed_after(checkout, "reports/diffusion.py") == {"tasks.threeways"}


def test_a_module_no_stage_imports_keys_nothing(checkout: Path) -> None:
    assert "benchmarks/bench.py" not in {str(p.relative_to(checkout)) for s in STAGES for p in code_files(s, checkout)}
    assert changed_after(checkout, "benchmarks/bench.py") == set()


def test_shared_modules_key_every_stage_that_imports_them(checkout: Path) -> None:
    assert changed_after(checkout, "eightgen/config.py") == set(STAGES)
    assert changed_after(checkout, "tasks/caching.py") == set(STAGES)
    # the referees train with it, and judging loads the referees; assembling, attacking and reporting do not
    assert changed_after(checkout, "eightgen/models/training.py") == {
        "tasks.train", "tasks.referees", "tasks.judge", "tasks.denoise", "tasks.sanity", "tasks.threeways"
    }


def test_the_denoiser_keys_the_diffusion_stages_only(checkout: Path) -> None:
    assert changed_after(checkout, "eightgen/diffusion/unet.py") == {"tasks.denoise", "tasks.sanity", "tasks.threeways"}
    assert changed_after(checkout, "eightgen/judge/frechet.py") == {"tasks.threeways"}


def test_an_import_added_by_an_edit_joins_the_key(checkout: Path) -> None:
    assert "benchmarks/bench.py" not in {str(p.relative_to(checkout)) for p in code_files("tasks.assemble", checkout)}
    code_digest("tasks.assemble", checkout)  # remember the closure before the edit
    with open(checkout / "tasks/assemble.py", "a") as f:
        f.write("\nfrom benchmarks import bench  # noqa\n")
    before = code_digest("tasks.assemble", checkout)
    with open(checkout / "benchmarks/bench.py", "a") as f:
        f.write("\n# edited\n")
    assert code_digest("tasks.assemble", checkout) != before


def test_relative_and_function_level_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "eightgen"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from .c import thing\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("thing = 1\n")
    (pkg / "d.py").write_text("")
    assert {p.name for p in code_files("eightgen.a", tmp_path)} == {"__init__.py", "a.py", "b.py", "c.py"}
