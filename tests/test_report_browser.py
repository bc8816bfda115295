"""The rendered report opened from disk in headless Chromium: no console errors, every image decodes, sections present."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from fixtures_report import make_run_dir
from reports.render import render_report
from reports.screenshot import ScreenshotError, chromium

SECTIONS = ["headline", "dataset", "classifier", "outcomes", "plots", "strips", "animation", "galleries", "config"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    """The Chromium executable on PATH (the test fails without one)."""
    try:
        return chromium()
    except ScreenshotError as exc:
        raise AssertionError(str(exc)) from None


class Browser:
    """A headless Chromium started for one test, driven over the DevTools protocol, killed by its PID."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="eightgen-chromium-"))
        self.log = open(self.profile.parent / f"{self.profile.name}.log", "wb")
        self.proc = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None, f"Chromium exited early (see {self.log.name})"
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.url = f"ws://127.0.0.1:{port}{path}"

    def close(self) -> None:
        """Kill the browser process this object started and remove its profile."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Session:
    """One page of a CDP connection: commands and the events seen so far."""

    def __init__(self, ws, session_id: str) -> None:
        self.ws, self.session_id, self.events, self.counter = ws, session_id, [], 0

    async def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self.counter += 1
        message = {"id": self.counter, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session_id
        await self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.counter:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    async def wait_for(self, method: str, timeout: float = 30) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                self.events.append(event)
                if event.get("method") == method:
                    return event

    async def drain(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                while True:
                    self.events.append(json.loads(await self.ws.recv()))
        except TimeoutError:
            pass

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and dialogs seen on the page."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params.get('args', [])]}")
            elif method == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log: {params['entry'].get('text')}")
            elif method == "Network.loadingFailed":
                out.append(f"load failed: {params.get('errorText')}")
            elif method == "Page.javascriptDialogOpening":
                out.append(f"dialog: {params.get('message')}")
        return out


async def open_page(ws, url: str, width: int = 1280, height: int = 900, load_timeout: float = 30) -> Session:
    """A fresh tab with console, log, network and page events on, loaded with url."""
    boot = Session(ws, "")
    target = await boot.send("Target.createTarget", {"url": "about:blank"}, session=False)
    attached = await boot.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False)
    page = Session(ws, attached["sessionId"])
    page.counter = boot.counter
    for domain in ("Runtime", "Log", "Page", "Network"):
        await page.send(f"{domain}.enable")
    await page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    await page.send("Page.navigate", {"url": url})
    await page.wait_for("Page.loadEventFired", timeout=load_timeout)
    return page


IMAGE_CHECK = """(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {n: imgs.length, bad: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
          noAlt: imgs.filter(i => !i.hasAttribute('alt')).length};
})()"""


async def inspect_report(url: str, screenshot: Path) -> dict:
    """Load the report, play an animation, and collect what the tests check."""
    browser = Browser()
    try:
        async with connect(browser.url, max_size=None) as ws:
            page = await open_page(ws, url)
            images = await page.evaluate(IMAGE_CHECK)
            sections = await page.evaluate(f"{json.dumps(SECTIONS)}.filter(id => document.getElementById(id) !== null)")
            frame0 = await page.evaluate("document.querySelector('.anim .anim-frame').src")
            await page.evaluate("document.querySelector('.anim button').click()")
            await page.drain(1.5)
            played = await page.evaluate(
                "({value: Number(document.querySelector('.anim input').value), src: document.querySelector('.anim .anim-frame').src,"
                " label: document.querySelector('.anim .label').textContent})"
            )
            await page.evaluate("window.scrollTo(0, 0)")
            shot = await page.send("Page.captureScreenshot", {"format": "png"})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return {"images": images, "sections": sections, "frame0": frame0, "played": played, "problems": page.problems()}
    finally:
        browser.close()


async def inspect_title(url: str) -> dict:
    """Load a report and read its heading and any problems (a script injected through the run name would show here)."""
    browser = Browser()
    try:
        async with connect(browser.url, max_size=None) as ws:
            page = await open_page(ws, url)
            await page.drain(0.5)
            heading = await page.evaluate("document.querySelector('h1').textContent")
            scripts = await page.evaluate("document.scripts.length")
            return {"heading": heading, "scripts": scripts, "problems": page.problems()}
    finally:
        browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered report of the synthetic fixture run."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("runs"), "browser-run", seeds=6)
    return render_report([run_dir])


@pytest.mark.slow
def test_report_opens_cleanly_in_chromium(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report-top.png"
    seen = asyncio.run(inspect_report(report.resolve().as_uri(), shot))
    assert seen["problems"] == []
    assert seen["images"]["n"] > 50
    assert seen["images"]["bad"] == []
    assert seen["images"]["noAlt"] == 0
    assert seen["sections"] == SECTIONS
    assert seen["played"]["value"] > 0, "the animation did not advance"
    assert seen["played"]["src"] != seen["frame0"]
    assert seen["played"]["label"].startswith("step ")
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_script_in_run_name_stays_text(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run_dir = make_run_dir(tmp_path, "evil", run_name=evil, seeds=2, digits=(2, 3))
    seen = asyncio.run(inspect_title(render_report([run_dir]).resolve().as_uri()))
    assert seen["problems"] == []
    assert evil in seen["heading"]
    assert seen["scripts"] == 2  # the animation data and its player, nothing injected
