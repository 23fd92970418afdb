"""The page at ``/`` in a real browser: headless Chromium (Debian's ``chromium``, started here) driven over the
DevTools protocol loads it, generates on the tiny model and is screenshotted."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30))
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """``open(url)`` -> a ``DevTools`` on a new page showing ``url``."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `apt-get install chromium` (.ci/setup does this)")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pages: list[DevTools] = []
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])

        def open_page(url: str) -> DevTools:
            target = requests.put(f"http://127.0.0.1:{port}/json/new?{url}", timeout=30).json()
            page = DevTools(target["webSocketDebuggerUrl"])
            pages.append(page)
            page.call("Runtime.enable")
            return page

        yield open_page
    finally:
        for page in pages:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_page_generates_with_live_progress(start_server, browser, reference_png, tmp_path):
    srv = start_server()
    page = browser(srv.url + "/")
    options = page.wait("document.readyState === 'complete' && [...document.querySelectorAll('#model option')]"
                        ".map(o => o.value).join(',')")
    assert options.split(",") == ["zimage-sharded:latest", "zimage-tiny:latest"]
    page.js("""
        document.getElementById('model').value = 'zimage-tiny:latest';
        document.getElementById('prompt').value = 'a red fox';
        document.getElementById('width').value = 64;
        document.getElementById('height').value = 48;
        document.getElementById('steps').value = 3;
        document.getElementById('seed').value = 7;
        document.getElementById('generate').click();
    """)
    page.wait("document.getElementById('result').naturalWidth > 0 && !document.getElementById('generate').disabled")
    state = page.js("""({
        src: document.getElementById('result').src,
        width: document.getElementById('result').naturalWidth,
        height: document.getElementById('result').naturalHeight,
        progress: document.getElementById('progress-text').textContent,
        seen: document.getElementById('progress-text').dataset.seen,
        error: document.getElementById('error').textContent,
        history: document.querySelectorAll('#history img').length,
    })""")
    assert state["error"] == ""
    assert (state["width"], state["height"]) == (64, 48)
    assert state["progress"] == "3/3" and state["seen"] == "0/3,1/3,2/3,3/3"
    assert state["src"].startswith("data:image/png;base64,")
    png = base64.b64decode(state["src"].split(",", 1)[1])
    assert png == reference_png("a red fox", 7, (64, 48), steps=3)
    assert state["history"] == 1

    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "page.png").write_bytes(shot)
    with Image.open(io.BytesIO(shot)) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
        assert len(colours) > 50  # a rendered page with the image, not a blank frame

    # A second image joins the session's history, newest first.
    page.js("document.getElementById('seed').value = 8; document.getElementById('generate').click();")
    page.wait("document.querySelectorAll('#history img').length === 2 && !document.getElementById('generate')"
              ".disabled")
    first = page.js("document.querySelector('#history img').src")
    assert base64.b64decode(first.split(",", 1)[1]) == reference_png("a red fox", 8, (64, 48), steps=3)


def test_page_is_self_contained(start_server):
    srv = start_server()
    response = requests.get(srv.url + "/", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "http://" not in response.text and "https://" not in response.text  # no CDN, nothing fetched elsewhere
