"""A bound on the request line and headers, which uvicorn's httptools server does not have.

uvicorn's h11 server refuses a request head past 16 KiB, but ``uvicorn[standard]``
serves with httptools, which buffers a header line however long it grows and keeps
any number of them: one client sending a never-ending header made the gateway's RSS
grow by hundreds of MiB. ``HeadLimitedHttpToolsProtocol`` counts the bytes received
while a request's head is incomplete and, past ``MAX_REQUEST_HEAD_BYTES``, answers
``431`` (RFC 6585) as problem JSON and closes the connection before httptools
buffers more.

``compactor gateway`` runs uvicorn with ``http=gateway_http_protocol()``.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

log = logging.getLogger("service.http")

# The API's own requests carry well under 1 KiB of headers, and proxies add a few KiB;
# 64 KiB is generous while bounding what each connection can make the server hold.
MAX_REQUEST_HEAD_BYTES = 64 * 1024

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools: h11 bounds the head itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _head_too_large_response(limit: int) -> bytes:
    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    body = json.dumps(
        {
            "type": "about:blank",
            "title": status.phrase,
            "status": int(status),
            "detail": f"the request line and headers are longer than {limit} bytes",
            # The path may be what is too long: it is not echoed back.
            "instance": "/",
            "code": "headers_too_large",
        }
    ).encode()
    head = (
        f"HTTP/1.1 {int(status)} {status.phrase}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


if HttpToolsProtocol is not None:

    class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, refusing request heads larger than ``max_head_bytes``.

        The count covers every byte received from the start of a request until its headers
        are complete, so it may include the first bytes of the body of a request that
        finished in the same read; it misses at most one read of a pipelined request's head.
        Either way the memory held stays within the limit plus one read (<= 256 KiB)."""

        max_head_bytes = MAX_REQUEST_HEAD_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reading_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._reading_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading_head = True
            self._head_bytes = 0

        def data_received(self, data: bytes) -> None:
            if self._reading_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._reading_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._refuse_head()

        def _refuse_head(self) -> None:
            log.warning("refused a request head larger than %d bytes from %s", self.max_head_bytes, self.client)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_head_too_large_response(self.max_head_bytes))
            # else: an earlier pipelined request is still being answered; a 431 now would
            # interleave with its response, so the connection just closes.
            self.transport.close()


def gateway_http_protocol() -> Any:
    """What ``uvicorn.run(http=...)`` gets: the head-limited httptools protocol, else h11
    (whose own 16 KiB limit on an incomplete request head then applies)."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return "h11"
    return HeadLimitedHttpToolsProtocol
