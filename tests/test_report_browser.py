"""The report as a person sees it: opened in headless Chromium (Debian's `chromium`) through the
DevTools protocol, every chart rendered (SVG present, of non-zero size, with drawn shapes), no
console error, no request beyond the file itself; a screenshot is kept as a test artifact
(under $DENGINE_ARTIFACTS when set)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dengine_cli.cli import cli

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Generous: a loaded machine may take long to start a browser; waits end on conditions.
TIMEOUT = 180.0

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (scripts/setup installs it)",
)


class DevTools:
    """A minimal DevTools protocol client over one page's websocket: commands by id, events kept."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=TIMEOUT, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result
            self.events.append(msg)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(json.loads(self.ws.recv()))
        raise AssertionError(f"no {method} within {TIMEOUT} s")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[DevTools]:
    """Chromium, headless, on a fresh profile, with the DevTools protocol on a loopback port."""
    assert CHROMIUM is not None, "chromium is missing: CI installs it with scripts/setup"
    profile = tmp_path / "profile"
    profile.mkdir()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: Per chart: its size on the page and how many shapes its SVG draws.
CHART_FACTS = """
JSON.stringify(Array.from(document.querySelectorAll('figure.chart')).map(f => {
  const svg = f.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {name: f.dataset.chart, width: box.width, height: box.height,
          shapes: svg ? svg.querySelectorAll('path, rect, use, image').length : 0,
          text: svg ? svg.querySelectorAll('g[id*="text"]').length : 0};
}))
"""


def test_report_renders_in_chromium(browser: DevTools, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    later = REPO / "fixtures" / "alpha-later.elf.zst"
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "report",
            "--index-dir",
            str(tmp_path / "idx"),
            "-o",
            str(out),
            "--host-memory",
            "64M",
            "--vm",
            f"alpha={REPO / 'fixtures' / 'alpha.elf.zst'},{later}",
            str(REPO / "fixtures" / "beta.elf.zst"),
        ],
    )
    assert result.exit_code == 0, result.output
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable")
    browser.call("Page.navigate", url=out.as_uri())
    browser.wait_for("Page.loadEventFired")
    facts = json.loads(browser.call("Runtime.evaluate", expression=CHART_FACTS)["result"]["value"])
    assert [f["name"] for f in facts] == ["breakdown", "host", "matrix", "series", "hot"]
    for chart in facts:
        assert chart["width"] > 100 and chart["height"] > 100, chart
        assert chart["shapes"] > 10, chart
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("DENGINE_ARTIFACTS"):
        artifacts = Path(os.environ["DENGINE_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "report.png").write_bytes(png)
        shutil.copy(out, artifacts / "report.html")
    errors = [
        e
        for e in browser.events
        if (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []
    requests = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests and all(url == out.as_uri() or url.startswith("data:") for url in requests), requests
