"""A headless Chromium driven through the DevTools protocol, for the ``browser`` tests.

Debian's ``chromium`` (no browser download: Playwright's would fail offline). ``Chromium.start()`` launches it
with ``--remote-debugging-port=0`` and reads the port it chose from its stderr; ``Page`` speaks the protocol
over the page target's websocket (``websockets``' synchronous client, installed with ``uvicorn[standard]``).
Waiting is polling a JavaScript condition until a deadline, never a fixed sleep.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The browser binary (env REFINEDET_CHROMIUM, else the first of ``BINARIES`` on PATH), or None."""
    given = os.environ.get("REFINEDET_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((p for p in map(shutil.which, BINARIES) if p), None)


class Page:
    """One tab: ``evaluate`` JavaScript, ``wait_for`` a condition, ``set_files`` on an input or ``drop_files``
    on an element, ``screenshot``."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url, max_size=64 << 20, open_timeout=10))
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console messages and uncaught exceptions, for failure messages
        self.call("Runtime.enable")
        self.call("Page.enable")

    def close(self) -> None:
        self._stack.close()

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events received meanwhile are kept in ``console``)."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.001)))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._note(message)

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif event.get("method") == "Runtime.exceptionThrown":
            self.console.append(params["exceptionDetails"].get("exception", {}).get("description", "error"))

    def set_viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", what=f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, what: str | None = None) -> Any:
        """Poll ``expression`` every 50 ms until it is truthy (returned), or fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}; console: {self.console}")
            time.sleep(0.05)

    def set_files(self, selector: str, *paths: str | Path) -> None:
        """Choose files in an ``<input type=file>`` as a person would (its change event fires)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise AssertionError(f"no element matches {selector!r}")
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def drop_files(self, selector: str, *paths: str | Path) -> None:
        """Drag files from outside the page and drop them on the middle of an element, as a person would."""
        x, y = self.evaluate(
            f"(r => [r.x + r.width / 2, r.y + r.height / 2])(document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect())"
        )
        data = {"items": [], "files": [str(Path(p).resolve()) for p in paths], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)

    def screenshot(self, path: str | Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        data = self.call("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 860) -> Iterator[Page]:
    """A headless Chromium with one blank page (``Page``), stopped and its profile removed afterwards."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="refinedet-chromium-")
    args = [
        binary,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",  # a synthetic webcam for the webcam mode
        f"--window-size={width},{height}",
        "about:blank",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    page = None
    try:
        port = _devtools_port(process)
        page = Page(_page_target(port))
        page.set_viewport(width, height)
        yield page
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(process: subprocess.Popen[str], timeout_s: float = 30.0) -> int:
    """The port from Chromium's ``DevTools listening on ws://127.0.0.1:PORT/...`` line on stderr. A thread
    keeps reading stderr afterwards, so that a chatty browser never blocks on a full pipe."""
    assert process.stderr is not None
    stderr = process.stderr
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line.rstrip())
        found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise RuntimeError("chromium did not start its DevTools server: " + " | ".join(seen[-10:]))


def _page_target(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
        targets = json.load(answer)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
