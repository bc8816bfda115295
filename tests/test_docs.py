"""The README and docs/ stay current: every project module is in docs/layout.md, every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

from eightgen.codekey import PROJECT_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]


def test_every_project_module_is_in_the_layout_page() -> None:
    layout = (DOCS / "layout.md").read_text()
    modules = [
        path.relative_to(ROOT).as_posix()
        for package in PROJECT_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py"
    ]
    assert modules
    assert [m for m in modules if f"`{m}`" not in layout] == []


def test_every_relative_link_points_to_an_existing_file() -> None:
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_links_every_docs_page_and_stays_short() -> None:
    readme = ROOT / "README.md"
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in relative_links(readme)}
    pages = [p for p in PAGES[1:]]
    assert pages, "docs/ holds no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []
    assert len(readme.read_text().splitlines()) <= 200


def test_the_readme_picture_is_committed_and_small() -> None:
    pictures = [t for t in relative_links(ROOT / "README.md") if t.endswith(".png")]
    assert pictures
    for target in pictures:
        path = ROOT / target
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", target
        assert path.stat().st_size < 300_000, target


def test_the_first_lines_are_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/eightgen run ")
    assert lines[4] == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q"
    assert lines[5] == "```"
