"""``compactor gateway`` as a real process on a free port: what production serves (uvicorn with
httptools and the head limit of ``service.http_limits``), with a tmp data dir and two API keys.

Used by the hostile-input tests, which need the real HTTP server (the ASGI transport skips
it) and the process's memory figures from /proc."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

from tests.support.gateway import ALICE, BOB
from tests.support.jobs import Proc, child_env, free_port, wait_answering

MIB = 1024 * 1024


class LiveGateway:
    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [sys.executable, "-m", "launcher.cli", "gateway", "--port", str(self.port)],
            child_env(data_dir, COMPACTOR_API_KEYS=f"alice:{ALICE},bob:{BOB}", **env),
            log_path,
        )
        self.pid = self.proc.pid
        wait_answering(self.proc, self.base_url)

    # -- memory, from /proc/<pid>/status

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        return self._status_kib("VmHWM") * 1024

    def reset_peak_rss(self) -> None:
        """Restart VmHWM from the current RSS (Linux: ``5`` into /proc/<pid>/clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    # -- raw HTTP

    def raw_exchange(self, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
        """Send ``request`` as is and read the answer (until the connection closes or one
        whole response with a Content-Length is in); returns (response bytes, seconds)."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
                sock.sendall(request)
            return read_response(sock), time.monotonic() - started

    def stop(self) -> None:
        self.proc.terminate(timeout=20)


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not piece:
            break
        data += piece
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator:
            length = content_length(head)
            if length is not None and len(body) >= length:
                break
    return data


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1.1 "), f"not an HTTP response: {data[:200]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body
