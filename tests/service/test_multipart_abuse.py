"""Hostile request bodies and heads against a real ``compactor gateway`` process.

Each case is sent as raw bytes over a socket (clients would refuse to build most of them)
to ``POST /v1/jobs``, ``/v1/models`` and ``/v1/datasets``, and must be answered with RFC 9457
problem JSON and the right 4xx within a few seconds; afterwards the server still answers,
no upload or temporary file is left in the data dir, and nothing appears outside it.

The gateway runs with ``COMPACTOR_MAX_UPLOAD_BYTES`` = 1 MiB so that "past the limit" is
cheap to reach.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.http_limits import MAX_REQUEST_HEAD_BYTES
from service.uploads import MAX_PART_HEADER_BYTES, MAX_PREAMBLE_BYTES, request_budget
from tests.support.gateway import ALICE, auth
from tests.support.live_gateway import MIB, LiveGateway, parse_response, read_response

MAX_UPLOAD_BYTES = MIB
ANSWER_WITHIN_SECONDS = 5.0
ENDPOINTS = ("/v1/jobs", "/v1/models", "/v1/datasets")
BOUNDARY = b"abuse-boundary"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("abuse")


@pytest.fixture(scope="module")
def gateway(root: Path) -> Iterator[LiveGateway]:
    server = LiveGateway(root / "data", root / "gateway.log", COMPACTOR_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES))
    yield server
    server.stop()


# -- building requests by hand


def file_field(endpoint: str) -> str:
    return "model" if endpoint == "/v1/jobs" else "file"


def part(headers: list[bytes], data: bytes, boundary: bytes = BOUNDARY) -> bytes:
    return b"--" + boundary + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + data + b"\r\n"


def file_part(name: str, data: bytes, filename: bytes = b"m.pt") -> bytes:
    return part([b'Content-Disposition: form-data; name="' + name.encode() + b'"; filename="' + filename + b'"'], data)


def closing(boundary: bytes = BOUNDARY) -> bytes:
    return b"--" + boundary + b"--\r\n"


def request_head(path: str, content_type: str, *, length: int | None, extra: bytes = b"") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: {content_type}\r\n{framing}").encode("latin-1")
        + extra
        + b"\r\n"
    )


def multipart_type(boundary: str = BOUNDARY.decode()) -> str:
    return f"multipart/form-data; boundary={boundary}"


def post(path: str, body: bytes, content_type: str = multipart_type(), extra: bytes = b"") -> bytes:
    return request_head(path, content_type, length=len(body), extra=extra) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


# -- checking answers


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, object]  # the JSON body (problem details for an error)
    seconds: float

    @property
    def problem(self) -> dict[str, object]:
        return self.body


def exchange(gateway: LiveGateway, request: bytes) -> Answer:
    raw, seconds = gateway.raw_exchange(request, timeout=ANSWER_WITHIN_SECONDS + 5)
    assert raw, f"no answer within {ANSWER_WITHIN_SECONDS + 5}s"
    status, headers, body = parse_response(raw)
    is_json = headers.get("content-type") in ("application/json", "application/problem+json")
    return Answer(status, headers, json.loads(body) if is_json else {}, seconds)


def assert_problem(answer: Answer, status: int, code: str) -> None:
    assert answer.headers.get("content-type") == "application/problem+json", answer
    assert (answer.status, answer.problem.get("code")) == (status, code), answer.problem
    assert answer.problem["status"] == status and answer.problem["title"] and answer.problem["detail"]
    assert answer.seconds < ANSWER_WITHIN_SECONDS, f"answered after {answer.seconds:.1f}s"


def storage_files(data_dir: Path) -> set[Path]:
    return {path for sub in ("uploads", "tmp") for path in (data_dir / sub).rglob("*")}


def tree_outside(root: Path, data_dir: Path) -> set[Path]:
    return {path for path in root.rglob("*") if data_dir not in path.parents and path != data_dir}


def etc_passwd_digest() -> str:
    return hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()


@pytest.fixture()
def untouched(gateway: LiveGateway, root: Path) -> Iterator[None]:
    """After the case: the server answers, storage holds nothing new, nothing new lies outside the data dir."""
    before_storage = storage_files(gateway.data_dir)
    before_outside = tree_outside(root, gateway.data_dir)
    passwd = etc_passwd_digest()
    yield
    assert httpx.get(f"{gateway.base_url}/v1/jobs", headers=auth(ALICE), timeout=5).status_code == 200
    assert storage_files(gateway.data_dir) == before_storage
    assert tree_outside(root, gateway.data_dir) == before_outside
    assert not [path for path in root.rglob("*") if "passwd" in path.name]
    assert etc_passwd_digest() == passwd


# -- malformed multipart framing, on every upload endpoint

MalformedBody = Callable[[str], bytes]

MALFORMED: dict[str, tuple[MalformedBody, str, int]] = {
    # name: (request for an endpoint, what the detail mentions, status)
    "part header line of 200 KB": (
        lambda ep: post(ep, part([b'Content-Disposition: form-data; name="x"; filename="' + b"a" * 200_000 + b'"'], b"x") + closing()),
        "header",
        400,
    ),
    "5000 part header lines": (
        lambda ep: post(ep, part([b"X-Filler: y"] * 5000 + [b'Content-Disposition: form-data; name="x"'], b"x") + closing()),
        "header",
        400,
    ),
    # Each line under python-multipart's own per-line limit; together over the per-part cap.
    "part headers over the per-part budget": (
        lambda ep: post(
            ep,
            part([b"X-Filler-%d: " % i + b"y" * 3000 for i in range(4)] + [b'Content-Disposition: form-data; name="x"'], b"x") + closing(),
        ),
        f"longer than {MAX_PART_HEADER_BYTES}",
        400,
    ),
    "preamble of line breaks and junk": (
        lambda ep: post(ep, b"\r\n" + b"junk without a hyphen " * 4000 + file_part(file_field(ep), b"x") + closing()),
        f"first {MAX_PREAMBLE_BYTES} bytes",
        400,
    ),
    "boundary of 5000 backslashes": (
        lambda ep: post(ep, b"--" + b"\\" * 5000 + b"\r\n", content_type=multipart_type('"' + "\\" * 5000 + '"')),
        "RFC 2046",
        400,
    ),
    "boundary of 71 characters": (
        lambda ep: post(ep, b"--" + b"b" * 71 + b"\r\n", content_type=multipart_type("b" * 71)),
        "RFC 2046",
        400,
    ),
    "boundary with characters RFC 2046 forbids": (
        lambda ep: post(ep, b"--a{b}\r\n", content_type=multipart_type("a{b}")),
        "RFC 2046",
        400,
    ),
    "no boundary parameter": (lambda ep: post(ep, b"--x\r\n", content_type="multipart/form-data"), "boundary", 400),
    "text that is not multipart": (lambda ep: post(ep, b"--x--\r\n", content_type="text/plain"), "Content-Type", 415),
    "wrong boundary in the body": (
        lambda ep: post(ep, file_part(file_field(ep), b"x") + closing(), content_type=multipart_type("other")),
        "multipart",
        400,
    ),
    "no closing boundary": (lambda ep: post(ep, file_part(file_field(ep), b"x")), "closing boundary", 400),
    "empty body": (lambda ep: post(ep, b""), "closing boundary", 400),
    "part without Content-Disposition": (lambda ep: post(ep, part([b"Content-Type: text/plain"], b"x") + closing()), "Content-Disposition", 400),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_multipart_is_refused(gateway: LiveGateway, untouched: None, endpoint: str, case: str) -> None:
    build, mentions, status = MALFORMED[case]
    answer = exchange(gateway, build(endpoint))
    code = "unsupported_media_type" if status == 415 else "invalid_request"
    assert_problem(answer, status, code)
    assert mentions in str(answer.problem["detail"]), answer.problem


# -- sizes


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_declared_length_past_the_limit_is_refused_before_the_body(gateway: LiveGateway, untouched: None, endpoint: str) -> None:
    head = request_head(endpoint, multipart_type(), length=request_budget(MAX_UPLOAD_BYTES) + 1)
    answer = exchange(gateway, head)  # no body follows: the answer must not wait for it
    assert_problem(answer, 413, "payload_too_large")


def stream_forever(sock: socket.socket, first: bytes, piece: bytes, stop: threading.Event) -> None:
    try:
        sock.sendall(first)
        while not stop.is_set():
            sock.sendall(piece)
    except OSError:
        pass  # the server closed the connection: what a refusal may do


def exchange_while_streaming(gateway: LiveGateway, first: bytes, piece: bytes) -> Answer:
    """Send ``first`` and then ``piece`` over and over, never ending the body; read the answer meanwhile."""
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=ANSWER_WITHIN_SECONDS + 5) as sock:
        sender = threading.Thread(target=stream_forever, args=(sock, first, piece, stop), daemon=True)
        started = time.monotonic()
        sender.start()
        try:
            raw = read_first_response(sock)
            seconds = time.monotonic() - started
        finally:
            stop.set()
        sender.join(timeout=10)
    status, headers, body = parse_response(raw)
    return Answer(status, headers, json.loads(body), seconds)


def read_first_response(sock: socket.socket) -> bytes:
    """One response, without waiting for the connection to close (uvicorn drains the body)."""
    data = read_response(sock)
    assert data, "the server closed the connection without an answer"
    return data


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_chunked_upload_past_the_limit_is_refused_while_it_streams(gateway: LiveGateway, untouched: None, endpoint: str) -> None:
    """No Content-Length: the bytes are counted as they arrive; the client is still sending when the 413 comes."""
    first = request_head(endpoint, multipart_type(), length=None) + chunk(file_part(file_field(endpoint), b"")[:-2])
    answer = exchange_while_streaming(gateway, first, chunk(b"\0" * 65536))
    assert_problem(answer, 413, "payload_too_large")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_endless_preamble_is_refused_long_before_the_limit(gateway: LiveGateway, untouched: None, endpoint: str) -> None:
    first = request_head(endpoint, multipart_type(), length=None) + chunk(b"\r\n")
    answer = exchange_while_streaming(gateway, first, chunk(b"\r\n" * 512))
    assert_problem(answer, 400, "invalid_request")
    assert "boundary" in str(answer.problem["detail"])


# -- the HTTP head (uvicorn with httptools has no limit of its own: service.http_limits)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"X-Huge: " + b"a" * 300_000 + b"\r\n", id="one header of 300 KB"),
        pytest.param(b"".join(b"X-H%d: a\r\n" % i for i in range(20_000)), id="20000 headers"),
    ],
)
def test_oversized_request_head_is_refused(gateway: LiveGateway, untouched: None, extra: bytes) -> None:
    before = gateway.rss_bytes()
    gateway.reset_peak_rss()
    answer = exchange(gateway, post("/v1/models", file_part("file", b"x") + closing(), extra=extra))
    assert_problem(answer, 431, "headers_too_large")
    assert answer.headers.get("connection") == "close"
    assert gateway.peak_rss_bytes() - before < 16 * MIB


def test_endless_header_is_cut_off(gateway: LiveGateway, untouched: None) -> None:
    """One header line that never ends: before the limit, the server's memory grew with it
    (200 MiB of header cost 400 MiB of RSS); now it answers 431 at 64 KiB and closes."""
    before = gateway.rss_bytes()
    gateway.reset_peak_rss()
    first = f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nX-Endless: ".encode()
    answer = exchange_while_streaming(gateway, first, b"a" * 65536)
    assert_problem(answer, 431, "headers_too_large")
    assert gateway.peak_rss_bytes() - before < 16 * MIB


def test_oversized_request_line_is_refused(gateway: LiveGateway, untouched: None) -> None:
    raw, seconds = gateway.raw_exchange(b"GET /v1/jobs?" + b"q" * 300_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert (status, json.loads(body)["code"]) == (431, "headers_too_large") and seconds < ANSWER_WITHIN_SECONDS


def test_a_head_under_the_limit_is_served(gateway: LiveGateway) -> None:
    padding = {"X-Padding": "p" * (MAX_REQUEST_HEAD_BYTES // 2)}
    answer = httpx.get(f"{gateway.base_url}/v1/jobs", headers={**auth(ALICE), **padding}, timeout=10)
    assert answer.status_code == 200, answer.text


# -- client file names and part names are never used


HOSTILE_FILENAMES = {
    "parent traversal": b"../../etc/passwd",
    "absolute": b"/etc/passwd",
    "NUL byte": b"passwd\x00.pt",
    "backslashes": b"..\\..\\passwd",
    "UTF-8": "模型-passwd.pt".encode(),
}


@pytest.mark.parametrize("filename", list(HOSTILE_FILENAMES))
def test_hostile_file_name_of_a_valid_upload_is_ignored(gateway: LiveGateway, root: Path, files, filename: str) -> None:
    before_outside = tree_outside(root, gateway.data_dir)
    passwd = etc_passwd_digest()
    answer = exchange(gateway, post("/v1/models", file_part("file", files.torchscript, HOSTILE_FILENAMES[filename]) + closing()))
    assert answer.status == 201, answer
    # Stored under the server's id, byte for byte; the client's name is nowhere.
    upload_id = str(answer.body["id"])
    assert (gateway.data_dir / "uploads" / upload_id).read_bytes() == files.torchscript
    assert not [path for path in gateway.data_dir.rglob("*") if "passwd" in path.name or "模型" in path.name]
    assert not list((gateway.data_dir / "tmp").iterdir())
    assert tree_outside(root, gateway.data_dir) == before_outside
    assert etc_passwd_digest() == passwd


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("filename", list(HOSTILE_FILENAMES))
def test_hostile_file_name_of_a_bad_upload_is_refused(gateway: LiveGateway, untouched: None, endpoint: str, filename: str) -> None:
    answer = exchange(gateway, post(endpoint, file_part(file_field(endpoint), b"GIF89a not a model", HOSTILE_FILENAMES[filename]) + closing()))
    expected = {
        "/v1/jobs": (415, "unsupported_model_format"),
        "/v1/models": (415, "unsupported_model_format"),
        "/v1/datasets": (422, "invalid_dataset"),
    }[endpoint]
    assert_problem(answer, *expected)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_non_ascii_part_name_is_refused_as_unexpected(gateway: LiveGateway, untouched: None, endpoint: str) -> None:
    answer = exchange(gateway, post(endpoint, part(['Content-Disposition: form-data; name="ü模\x00"'.encode()], b"x") + closing()))
    assert_problem(answer, 422, "invalid_request")
