"""Streaming request bodies: multipart parts go straight to storage, chunk by chunk.

The body is never held whole in memory. ``read_multipart`` runs in a worker thread
(``anyio.to_thread``): it pulls the raw body from the event loop one chunk at a
time (``anyio.from_thread.run``), feeds python-multipart's streaming parser, and
hands each file part's data to ``LocalStorage.save_upload_stream`` as it arrives
(sha256 computed on the way). Limits:

* ``Content-Length`` above the request budget → 413 before a byte is read;
* the bytes actually received are counted, so a missing or lying Content-Length
  cannot get past the budget either;
* each file part is limited to ``settings.max_upload_bytes`` by the storage;
* the framing is bounded before the parser buffers anything: the boundary must be
  what RFC 2046 allows (1-70 characters from its set), the preamble before the first
  boundary is at most ``MAX_PREAMBLE_BYTES``, and each part's headers at most
  ``MAX_PART_HEADER_LINES`` lines and ``MAX_PART_HEADER_BYTES`` bytes. Whatever the
  installed python-multipart version enforces itself, these hold.

The request line and HTTP headers are bounded before the app sees them
(``service.http_limits``).

The request budget is ``max_upload_bytes`` plus a small allowance for the form's
framing and the spec. On any failure the caller deletes what this request stored;
the storage itself never keeps a partial file. Client file names are never used.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio.from_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from compactor.storage import LocalStorage, PayloadTooLarge
from service.errors import ApiError

FORM_ALLOWANCE_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_JSON_BODY_BYTES = 1024 * 1024
MAX_PARTS = 8
# A client never needs more: a part carries Content-Disposition and maybe Content-Type
# (a few hundred bytes with a 255-byte file name). The caps keep a part's headers, which
# are buffered whole, from growing with the body.
MAX_PART_HEADER_LINES = 16
MAX_PART_HEADER_BYTES = 8 * 1024
# RFC 2046 allows a preamble before the first boundary; no HTTP client sends one, and the
# parser would skip an endless one up to the whole request budget (2 GiB by default).
MAX_PREAMBLE_BYTES = 4 * 1024
# RFC 2046 §5.1.1: 1-70 characters, from this set, not ending in a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

MULTIPART = "multipart/form-data"
JSON = "application/json"


def media_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    raw = request.headers.get("content-type", "")
    kind, options = parse_options_header(raw)
    return kind.decode("latin-1").lower(), options


def unsupported_media_type(request: Request, allowed: tuple[str, ...]) -> ApiError:
    got = request.headers.get("content-type") or "none"
    return ApiError(415, "unsupported_media_type", f"Content-Type {got!r} is not accepted here; send {' or '.join(allowed)}")


def request_budget(max_upload_bytes: int) -> int:
    return max_upload_bytes + FORM_ALLOWANCE_BYTES


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request is larger than the limit of {limit} bytes; nothing was kept")


def check_content_length(request: Request, budget: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
    if length > budget:
        raise too_large(budget)


async def read_json_body(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
    """A small JSON body, counted while it arrives (never more than ``limit`` bytes in memory)."""
    check_content_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


# The event loop collects the body's pieces (64-256 KiB each, as the server delivers them)
# until about this much, then hands them to the worker thread in one cross-thread round
# trip (~0.1-0.2 ms of CPU each): one round trip per MiB instead of one per piece. The
# pieces are handed over as they are, never joined: joining costs a copy of every byte,
# and pieces that fit the CPU's L2 cache are hashed and written while still in it.
BODY_BATCH_BYTES = 1024 * 1024


def body_chunks_from_thread(request: Request, budget: int, batch_bytes: int = BODY_BATCH_BYTES) -> Iterator[bytes]:
    """The raw request body, read from a worker thread; counts bytes against ``budget``.

    The loop collects about ``batch_bytes`` per hand-off, and only when the thread asks:
    memory stays bounded by one batch (plus the 64 KiB the server buffers before it stops
    reading the socket). (Reading the next batch ahead while the thread works was measured
    too: no faster on two busy cores, and more memory.)"""
    stream: AsyncIterator[bytes] = request.stream().__aiter__()
    finished = False
    received = 0

    async def next_batch() -> list[bytes]:
        nonlocal finished
        batch: list[bytes] = []
        size = 0
        while not finished:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                finished = True
                break
            if chunk:
                batch.append(chunk)
                size += len(chunk)
                # Past the budget there is no point in reading on: the thread answers 413.
                if size >= batch_bytes or received + size > budget:
                    break
        return batch

    while True:
        batch = anyio.from_thread.run(next_batch)
        if not batch:
            return
        for chunk in batch:
            received += len(chunk)
            if received > budget:
                raise too_large(budget)
            yield chunk


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    _reader: _MultipartReader = field(repr=False)

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    def chunks(self) -> Iterator[bytes]:
        return self._reader.part_data()

    def read_text(self, limit: int = MAX_TEXT_FIELD_BYTES) -> str:
        data = bytearray()
        for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, "payload_too_large", f"form field {self.name!r} is larger than {limit} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_request", f"form field {self.name!r} is not UTF-8 text") from None


def malformed(detail: str) -> ApiError:
    return ApiError(400, "invalid_request", detail)


class _MultipartReader:
    """Pull-style wrapper around python-multipart's push parser (used from one thread)."""

    def __init__(self, raw: Iterator[bytes], boundary: bytes) -> None:
        self._raw = raw
        self._delimiter = b"--" + boundary
        self._events: deque[tuple[str, Any]] = deque()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._header_lines = 0
        self._header_bytes = 0
        self._preamble_bytes = 0
        self._preamble_tail = b""
        self._boundary_seen = False
        self._seen_part = False
        self._finished = False
        self._in_part = False
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": lambda: self._events.append(("end_part", None)),
            "on_header_field": lambda data, start, end: self._add_header_bytes(self._header_field, data, start, end),
            "on_header_value": lambda data, start, end: self._add_header_bytes(self._header_value, data, start, end),
            "on_header_end": self._on_header_end,
            "on_headers_finished": lambda: self._events.append(("headers", dict(self._headers))),
            "on_end": lambda: self._events.append(("end", None)),
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - python-multipart refuses some boundaries itself
            raise malformed(f"unusable multipart boundary: {exc}") from None

    def _on_part_begin(self) -> None:
        self._seen_part = True
        self._headers = {}
        self._header_lines = 0
        self._header_bytes = 0
        self._events.append(("begin", None))

    def _add_header_bytes(self, into: bytearray, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise malformed(f"a form part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
        into.extend(data[start:end])

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        if type(data) is not bytes:
            # A buffer the parser may reuse (a look-behind buffer, in some versions): copy.
            self._events.append(("data", bytes(data[start:end])))
        elif start == 0 and end == len(data):
            self._events.append(("data", data))
        else:
            # No copy: the body's pieces are immutable bytes, so a view of one stays valid.
            self._events.append(("data", memoryview(data)[start:end]))

    def _on_header_end(self) -> None:
        self._header_lines += 1
        if self._header_lines > MAX_PART_HEADER_LINES:
            raise malformed(f"a form part has more than {MAX_PART_HEADER_LINES} header lines")
        # Latin-1 keeps the raw bytes (parse_options_header works on them); names and file
        # names are decoded as UTF-8 afterwards, as clients send them (RFC 7578 §4.2).
        self._headers[self._header_field.decode("latin-1").strip().lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _next(self) -> tuple[str, Any]:
        while not self._events:
            if self._finished:
                raise malformed("the multipart body ended early (no closing boundary)")
            chunk = next(self._raw, None)
            if chunk is not None and not self._seen_part:
                self._count_preamble(chunk)
            try:
                if chunk is None:
                    self._finished = True
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - python-multipart raises its own errors on malformed input
                raise malformed(f"malformed multipart body: {exc}") from None
        return self._events.popleft()

    def _count_preamble(self, chunk: bytes) -> None:
        """Count what precedes the first boundary, before the parser skips over it.

        The boundary may arrive split over any number of pieces (a client may send one byte at a
        time), so the search runs over the unresolved tail of earlier pieces plus this one; only
        bytes that can no longer start the boundary count as preamble."""
        if self._boundary_seen:
            return
        window = self._preamble_tail + chunk
        found = window.find(self._delimiter)
        if found >= 0:
            self._preamble_bytes += found
            self._boundary_seen = True
            self._preamble_tail = b""
        else:
            keep = min(len(window), len(self._delimiter) - 1)
            self._preamble_bytes += len(window) - keep
            self._preamble_tail = window[len(window) - keep :]
        if self._preamble_bytes > MAX_PREAMBLE_BYTES:
            raise malformed(f"no multipart boundary within the first {MAX_PREAMBLE_BYTES} bytes of the body")

    def parts(self) -> Iterator[Part]:
        count = 0
        while True:
            kind, value = self._next()
            if kind == "end":
                return
            if kind != "begin":
                raise ApiError(400, "invalid_request", "malformed multipart body")
            kind, headers = self._next()
            if kind != "headers":
                raise ApiError(400, "invalid_request", "malformed multipart part headers")
            count += 1
            if count > MAX_PARTS:
                raise ApiError(400, "invalid_request", f"too many form parts (at most {MAX_PARTS})")
            disposition, options = parse_options_header(headers.get("content-disposition", ""))
            if disposition != b"form-data" or b"name" not in options:
                raise ApiError(400, "invalid_request", "each form part needs Content-Disposition: form-data; name=...")
            filename = options.get(b"filename")
            self._in_part = True
            part = Part(
                name=options[b"name"].decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=headers.get("content-type"),
                _reader=self,
            )
            yield part
            # Skip whatever the consumer did not read of this part.
            for _ in self.part_data():
                pass

    def part_data(self) -> Iterator[bytes]:
        while self._in_part:
            kind, value = self._next()
            if kind == "data":
                yield value
            elif kind == "end_part":
                self._in_part = False
            else:
                raise ApiError(400, "invalid_request", "malformed multipart body")


def multipart_boundary(request: Request) -> bytes:
    """The request's multipart boundary, checked against RFC 2046 (400 when missing or invalid)."""
    kind, options = media_type(request)
    boundary = options.get(b"boundary")
    if kind != MULTIPART or not boundary:
        raise malformed("multipart/form-data needs a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise malformed("the multipart boundary must be 1-70 characters of letters, digits and '()+_,-./:=? (RFC 2046)")
    return boundary


def multipart_parts(request: Request, budget: int) -> Iterator[Part]:
    """The form's parts in order, streamed. Call from a worker thread only."""
    return _MultipartReader(body_chunks_from_thread(request, budget), multipart_boundary(request)).parts()


@dataclass
class StoredFile:
    upload_id: str
    size_bytes: int
    sha256: str


def store_file_part(storage: LocalStorage, part: Part, upload_id: str, max_bytes: int) -> StoredFile:
    """Write a file part straight into storage as ``upload_id`` (never the client's file name)."""
    size, sha256 = storage.save_upload_stream(upload_id, part.chunks(), max_bytes)
    return StoredFile(upload_id=upload_id, size_bytes=size, sha256=sha256)
