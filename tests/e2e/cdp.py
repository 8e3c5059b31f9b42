"""Headless Chromium driven over the Chrome DevTools Protocol, for the dashboard's browser tests.

Just enough of CDP for tests: start Debian's ``chromium`` headless, connect to its browser
websocket (the ``websockets`` package, which uvicorn[standard] brings), open a tab, evaluate
JavaScript in it, collect what it reports (uncaught exceptions, console errors) and take
screenshots. No selenium or playwright: those download browsers of their own.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_BINARIES = ("chromium", "chromium-browser")
# What the issue asks for, plus a throwaway profile and a port the browser picks itself.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CDPError(AssertionError):
    """A CDP call failed, or the page threw while evaluating an expression."""


def find_chromium() -> str | None:
    for name in CHROMIUM_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium process, in its own session so that all its helpers stop with it."""

    def __init__(self, binary: str, profile_dir: Path, log_path: Path, *, start_timeout: float = 30.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - held for the process's lifetime, closed when it stops
        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}",
                "--no-first-run",
                "--no-default-browser-check",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        try:
            self.websocket_url = self._wait_listening(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_listening(self, timeout: float) -> str:
        # With --remote-debugging-port=0 the only way to learn the port is the line on stderr.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"chromium did not open its DevTools port within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class CDP:
    """The browser-level DevTools connection; tabs are reached through flattened sessions."""

    def __init__(self, websocket_url: str) -> None:
        self._resources = ExitStack()
        # Screenshots arrive as one base64 message: allow large frames.
        self._ws: ClientConnection = self._resources.enter_context(connect(websocket_url, max_size=64 * 2**20, open_timeout=10))
        self._ids = itertools.count(1)
        # Events in arrival order: (sessionId or None, method, params).
        self.events: list[tuple[str | None, str, dict[str, Any]]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"no answer to {method} within {timeout:.0f}s")
            reply = self._receive(remaining)
            if reply is not None and reply.get("id") == message_id:
                if "error" in reply:
                    raise CDPError(f"{method} failed: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """One message; events are recorded, answers returned. None when nothing came in time."""
        try:
            raw = self._ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        message: dict[str, Any] = json.loads(raw)
        if "method" in message:
            self.events.append((message.get("sessionId"), message["method"], message.get("params", {})))
        return message

    def wait_event(
        self,
        method: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
        *,
        session: str | None = None,
        timeout: float = 30.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first event ``method`` (of ``session``, from index ``since`` on) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for sid, name, params in self.events[seen:]:
                if name == method and (session is None or sid == session) and predicate(params):
                    return params
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"no {method} event within {timeout:.0f}s")
            self._receive(min(remaining, 0.2))

    def pump(self, seconds: float = 0.0) -> None:
        """Read whatever events arrive within ``seconds`` (at least what is already there)."""
        deadline = time.monotonic() + seconds
        while self._receive(max(deadline - time.monotonic(), 0.001)) is not None:
            pass

    def new_tab(self, width: int = 1280, height: int = 900) -> Tab:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, session)
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return tab

    def close(self) -> None:
        self._resources.close()


class Tab:
    """One page, through its CDP session."""

    def __init__(self, cdp: CDP, session: str) -> None:
        self.cdp = cdp
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        return self.cdp.call(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        since = len(self.cdp.events)
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.cdp.wait_event("Page.loadEventFired", session=self.session, timeout=timeout, since=since)

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """The JSON value of ``expression`` in the page; raises with the page's message if it throws."""
        result = self.call(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": await_promise,
            },
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"the page threw evaluating {expression[:200]!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.1) -> Any:
        """Polls ``expression`` until its JSON value is truthy (say ``!!element``, not the element); returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.cdp.pump(interval)

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the viewport) as a PNG."""
        # Only the tab in front renders frames; a capture of one behind it would wait forever.
        self.call("Page.bringToFront")
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        data = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
        )["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def blocked_urls(self) -> list[str]:
        """URLs the tab requested and the browser refused (``Network.setBlockedURLs``; needs ``Network.enable``)."""
        self.cdp.pump()
        requested: dict[str, str] = {}
        blocked: list[str] = []
        for sid, method, params in self.cdp.events:
            if sid != self.session:
                continue
            if method == "Network.requestWillBeSent":
                requested[params["requestId"]] = params["request"]["url"]
            elif method == "Network.loadingFailed" and params.get("blockedReason"):
                blocked.append(requested.get(params["requestId"], "?"))
        return blocked

    def mark(self) -> int:
        """A position in the event record, for ``problems(since=...)``."""
        self.cdp.pump()
        return len(self.cdp.events)

    def problems(self, since: int = 0) -> list[str]:
        """What the page reported as going wrong: uncaught exceptions, console errors, failed loads."""
        self.cdp.pump()
        found: list[str] = []
        for sid, method, params in self.cdp.events[since:]:
            if sid != self.session:
                continue
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
                found.append(f"console.{params['type']}: {[arg.get('value') for arg in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        return found
