"""Streaming request bodies: multipart parts go straight to storage, chunk by chunk.

The body is never held whole in memory. ``read_multipart`` runs in a worker thread
(``anyio.to_thread``): it pulls the raw body from the event loop one chunk at a
time (``anyio.from_thread.run``), feeds python-multipart's streaming parser, and
hands each file part's data to ``LocalStorage.save_upload_stream`` as it arrives
(sha256 computed on the way). Limits:

* ``Content-Length`` above the request budget → 413 before a byte is read;
* the bytes actually received are counted, so a missing or lying Content-Length
  cannot get past the budget either;
* each file part is limited to ``settings.max_upload_bytes`` by the storage.

The request budget is ``max_upload_bytes`` plus a small allowance for the form's
framing and the spec. On any failure the caller deletes what this request stored;
the storage itself never keeps a partial file. Client file names are never used.
"""

from __future__ import annotations

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
    _reader: "_MultipartReader" = field(repr=False)

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


class _MultipartReader:
    """Pull-style wrapper around python-multipart's push parser (used from one thread)."""

    def __init__(self, raw: Iterator[bytes], boundary: bytes) -> None:
        self._raw = raw
        self._events: deque[tuple[str, Any]] = deque()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._finished = False
        self._in_part = False
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": lambda: self._events.append(("end_part", None)),
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": lambda: self._events.append(("headers", dict(self._headers))),
            "on_end": lambda: self._events.append(("end", None)),
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._events.append(("begin", None))

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
        self._headers[self._header_field.decode("latin-1").strip().lower()] = self._header_value.decode("utf-8", "replace")
        self._header_field.clear()
        self._header_value.clear()

    def _next(self) -> tuple[str, Any]:
        while not self._events:
            if self._finished:
                raise ApiError(400, "invalid_request", "the multipart body ended early (no closing boundary)")
            chunk = next(self._raw, None)
            try:
                if chunk is None:
                    self._finished = True
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except ApiError:
                raise
            except Exception as exc:  # python-multipart raises its own errors on malformed input
                raise ApiError(400, "invalid_request", f"malformed multipart body: {exc}") from None
        return self._events.popleft()

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


def multipart_parts(request: Request, budget: int) -> Iterator[Part]:
    """The form's parts in order, streamed. Call from a worker thread only."""
    kind, options = media_type(request)
    boundary = options.get(b"boundary")
    if kind != MULTIPART or not boundary:
        raise ApiError(400, "invalid_request", "multipart/form-data needs a boundary parameter")
    return _MultipartReader(body_chunks_from_thread(request, budget), boundary).parts()


@dataclass
class StoredFile:
    upload_id: str
    size_bytes: int
    sha256: str


def store_file_part(storage: LocalStorage, part: Part, upload_id: str, max_bytes: int) -> StoredFile:
    """Write a file part straight into storage as ``upload_id`` (never the client's file name)."""
    size, sha256 = storage.save_upload_stream(upload_id, part.chunks(), max_bytes)
    return StoredFile(upload_id=upload_id, size_bytes=size, sha256=sha256)
