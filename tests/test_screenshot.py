"""`python -m reports.screenshot` refuses what it cannot draw in one line, before starting a browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from reports.screenshot import main


@pytest.mark.parametrize("make", ["missing", "empty", "not_html"])
def test_refuses_what_holds_no_report(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    target = tmp_path / "run"
    if make == "empty":
        target.mkdir()
    elif make == "not_html":
        target = tmp_path / "results.csv"
        target.write_text("a\n")
    out = tmp_path / "out.png"
    assert main([str(target), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eightgen: error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_refuses_a_bad_crop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.html").write_text("<html></html>")
    assert main([str(tmp_path), str(tmp_path / "out.png"), "--crop", "top"]) == 2
    assert "--crop must be two whole numbers" in capsys.readouterr().err
