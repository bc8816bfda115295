"""A run's report as a PNG, taken with headless Chromium: `python -m reports.screenshot RUN_DIR OUT.png`.

RUN_DIR is a run directory (its `report.html`), an experiment directory (`aligned.html`, `diffusion.html`)
or an HTML file. `--window-size W,H` sets the page area taken (a tall window takes the whole page), `--crop
TOP,BOTTOM` keeps the rows between two pixel offsets of it, and `--width` shrinks the result (Pillow, aspect
kept); the picture is stored with a palette of `--colors` (256; 0 keeps full colour).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from eightgen.rundir import REPORT
from reports.files import ALIGNED_HTML, DIFFUSION_HTML

PAGES = (REPORT, ALIGNED_HTML, DIFFUSION_HTML)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


class ScreenshotError(Exception):
    """Why no picture was made, in one line."""


def find_page(target: Path) -> Path:
    """The HTML page of a run directory (or the file itself)."""
    if target.is_file():
        if target.suffix != ".html":
            raise ScreenshotError(f"{target} is not an HTML file")
        return target.resolve()
    if not target.is_dir():
        raise ScreenshotError(f"{target}: no such run directory")
    for name in PAGES:
        if (target / name).is_file():
            return (target / name).resolve()
    raise ScreenshotError(f"{target} holds no {', '.join(PAGES)}: render it first (eightgen report {target})")


def chromium() -> str:
    """The Chromium executable on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise ScreenshotError("Chromium not found: apt-get update && apt-get install -y chromium")


def screenshot(target: Path, out: Path, *, window: tuple[int, int] = (1280, 1600),
               crop: tuple[int, int] | None = None, width: int | None = None, colors: int = 256,
               timeout: float = 120) -> Path:
    """Render the page of `target` to the PNG `out`; returns `out`."""
    page = find_page(target)
    url = page.as_uri()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eightgen-screenshot-") as tmp:
        raw = Path(tmp) / "raw.png"
        cmd = [chromium(), *FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}", f"--screenshot={raw}",
               f"--window-size={window[0]},{window[1]}", url]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ScreenshotError(f"Chromium took more than {timeout:.0f} s on {page}") from exc
        if not raw.is_file():
            tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise ScreenshotError(f"Chromium wrote no screenshot (exit {done.returncode}): {tail[0]}")
        from PIL import Image

        with Image.open(raw) as img:
            img = img.convert("RGB")
            if crop:
                top, bottom = max(0, crop[0]), min(img.height, crop[1])
                if bottom <= top:
                    raise ScreenshotError(f"--crop {crop[0]},{crop[1]} leaves nothing of a {img.height}-pixel page")
                img = img.crop((0, top, img.width, bottom))
            if width and img.width > width:
                img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
            if colors:
                img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            img.save(out, optimize=True)
    return out


def pair(text: str, option: str) -> tuple[int, int]:
    """Two positive integers written A,B."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ScreenshotError(f"{option} must be two whole numbers A,B, not {text!r}") from None
    if a < 0 or b <= 0:
        raise ScreenshotError(f"{option} {text}: numbers must be positive")
    return a, b


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run or experiment directory, or an HTML file")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--window-size", default="1280,1600", help="browser window W,H in pixels (default 1280,1600)")
    parser.add_argument("--crop", help="TOP,BOTTOM: keep these rows of the page (pixels, before shrinking)")
    parser.add_argument("--width", type=int, help="shrink the picture to this width")
    parser.add_argument("--colors", type=int, default=256, help="palette size of the PNG (default 256; 0: full colour)")
    args = parser.parse_args(argv)
    try:
        window = pair(args.window_size, "--window-size")
        crop = pair(args.crop, "--crop") if args.crop else None
        path = screenshot(args.run_dir, args.out, window=window, crop=crop, width=args.width,
                          colors=args.colors)
    except ScreenshotError as exc:
        print(f"eightgen: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
