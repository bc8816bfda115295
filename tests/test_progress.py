"""Progress of long work: plain lines at a steady rate off a terminal, a live bar on one, safe from several threads."""

from __future__ import annotations

import io
import re
import threading

import pytest
from rich.console import Console
from rich.errors import MissingStyle
from rich.theme import Theme

from tasks.progress import BOARD, LinePacer, choose_display, elsewhere, meter, progress_line


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(out: io.StringIO) -> str:
    """What a terminal was sent, without its colour and cursor codes."""
    return ANSI.sub("", out.getvalue())


def terminal() -> tuple[Console, io.StringIO]:
    """A terminal console like the one Prefect's log handler prints to: a theme of its own, without rich's styles."""
    out = io.StringIO()
    theme = Theme({"log.info_level": "cyan"}, inherit=False)
    return Console(file=out, force_terminal=True, force_interactive=True, width=120, theme=theme), out


def pipe() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120), out


def test_a_bar_only_on_an_interactive_terminal_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_display(interactive=True, elsewhere=False) == "bar"
    assert choose_display(interactive=False, elsewhere=False) == "lines"
    assert choose_display(interactive=True, elsewhere=True) == "lines"  # a Dask worker or a deployment run
    assert terminal()[0].is_interactive and not pipe()[0].is_interactive
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert not elsewhere()
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000000")  # what Prefect's workers set
    assert elsewhere()
    console, out = terminal()
    with meter("chunk 0", lambda line: None, 10, console=console) as shown:
        shown.update(10)
    assert out.getvalue() == ""


def test_progress_line_says_how_far_and_how_long() -> None:
    assert progress_line("chunk 3", 20, 50, "steps", 4.0) == "chunk 3: 20/50 steps (40%), 4.0 s, ~6 s left"
    assert progress_line("training", 480, 480, "batches", 9.5, "epoch 2/2") == "training: epoch 2/2, 480/480 batches (100%), 9.5 s"


def test_off_a_terminal_plain_lines_mark_each_tenth_and_nothing_reaches_the_stream() -> None:
    console, out = pipe()
    lines: list[str] = []
    with meter("chunk 0", lines.append, 200, console=console, pacer=LinePacer(interval=0.0)) as shown:
        for step in range(1, 201):
            shown.update(step)
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert lines[4].startswith("chunk 0: 100/200 steps (50%)")
    assert out.getvalue() == ""  # no bar, no control codes: the log handler is the only writer


def test_plain_lines_come_no_more_often_than_the_interval() -> None:
    clock, lines = Clock(), []
    with meter("training", lines.append, 100, unit="batches", display="lines", pacer=LinePacer(interval=5.0, clock=clock)) as shown:
        for done in range(1, 101):
            clock.now = done * 0.25  # 25 s in all: a line per 5 s, not per tenth
            shown.update(done, detail=f"epoch {1 + (done - 1) // 50}/2")
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines] == ["20", "40", "60", "80", "100"]
    assert lines[0] == "training: epoch 1/2, 20/100 batches (20%), 5.0 s, ~20 s left"
    assert lines[-1] == "training: epoch 2/2, 100/100 batches (100%), 25.0 s"


def test_a_total_learnt_late_and_a_total_never_learnt() -> None:
    lines: list[str] = []
    with meter("report", lines.append, display="lines", pacer=LinePacer(interval=0.0)) as shown:
        shown.update(3)  # size unknown yet: nothing to say
        for done in range(1, 12):
            shown.update(done, 11)
    assert len(lines) == 10 and lines[-1].startswith("report: 11/11 steps (100%)")


def test_on_a_terminal_a_bar_is_drawn_and_ends_full() -> None:
    console, out = terminal()
    lines: list[str] = []
    with meter("chunk 1", lines.append, 50, console=console) as shown:
        assert shown.__class__.__name__ == "BarMeter"
        for step in range(1, 31):
            shown.update(step)  # stops short: the bar still shows the finished work at the end
    assert "\x1b[" in out.getvalue()
    drawn = plain(out)
    assert "━" in drawn and "chunk 1" in drawn
    assert re.search(r"50/50 steps 100%", drawn), drawn[-500:]
    assert lines == [] and BOARD.showing() == 0


def test_log_lines_print_above_a_live_bar_on_the_same_console() -> None:
    console, out = terminal()
    with meter("training", lambda line: None, 10, unit="batches", console=console) as shown:
        shown.update(5)
        console.print("epoch 1/2: train_loss 0.1")
        shown.update(10)
    drawn = plain(out)
    assert "epoch 1/2: train_loss 0.1" in drawn and "training" in drawn
    console.print("[log.info_level]INFO[/]")  # the console's own styles survive the bar; the bar's are gone with it
    with pytest.raises(MissingStyle):
        console.get_style("bar.back")


def test_a_failed_block_takes_its_bar_down() -> None:
    console, _ = terminal()
    with pytest.raises(RuntimeError, match="boom"), meter("chunk 2", lambda line: None, 10, console=console) as shown:
        shown.update(3)
        raise RuntimeError("boom")
    assert BOARD.showing() == 0


@pytest.mark.parametrize("display", ["bar", "lines"])
def test_several_threads_share_one_display(display: str) -> None:
    console, out = terminal() if display == "bar" else pipe()
    lines: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start, middle = threading.Barrier(4), threading.Barrier(4)
    open_at_once: list[int] = []

    def chunk(i: int) -> None:
        try:
            start.wait()

            def log(line: str) -> None:
                with lock:
                    lines.append(line)

            with meter(f"chunk {i}", log, 100, console=console, pacer=LinePacer(interval=0.0)) as shown:
                for step in range(1, 101):
                    shown.update(step)
                    if step == 50:  # every chunk is half done at once
                        middle.wait()
                        open_at_once.append(BOARD.showing())
                        middle.wait()
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=chunk, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and BOARD.showing() == 0
    assert open_at_once == ([4] * 4 if display == "bar" else [0] * 4)
    if display == "bar":
        drawn = plain(out)
        assert all(re.search(rf"chunk {i} ━+ 100/100 steps 100%", drawn) for i in range(4)), drawn[-1000:]
        assert lines == []
    else:
        assert len(lines) == 40 and all(sum(line.startswith(f"chunk {i}:") for line in lines) == 10 for i in range(4))
        assert out.getvalue() == ""
