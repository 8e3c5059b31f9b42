"""The operations dashboard: one HTML page at ``/`` and its script, stylesheet and icon under ``/static/``.

The page holds no data: it is the same for everyone and needs no key to load. Its script
asks the API for the tenant's jobs with the key the user enters (``Authorization:
Bearer``), exactly as any other client does, and follows running jobs on
``GET /v1/jobs/{id}/events``. No build step, no third-party code, nothing fetched from
another origin: the files are shipped as package data (``service/static``).

Only the files named in ``ASSETS`` are served — a fixed table, not a directory mount, so
no request path ever reaches the filesystem. Every response says ``nosniff``; the page
carries a strict Content-Security-Policy (scripts and styles from this origin only, no
inline script), so that a job's data, even if it were ever rendered carelessly, could not
run as code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import not_found

router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # blob: for the object URLs that artifact downloads are saved through.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
# The URL fragment may carry an API key (#key=...); browsers never send fragments, and this
# keeps even the page's own URL out of Referer headers.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Revalidate on every load (a cheap 304 thanks to the ETag), so an upgrade is seen at once.
CACHE_CONTROL = "no-cache"

PAGE = "index.html"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


@cache
def static_file(name: str, media_type: str) -> StaticFile:
    """A file of ``service/static``, read once (they are a few kilobytes and never change at run time)."""
    body = resources.files("service").joinpath("static", name).read_bytes()
    return StaticFile(body, media_type, f'"{hashlib.sha256(body).hexdigest()}"')


def _respond(request: Request, asset: StaticFile, extra_headers: dict[str, str] | None = None) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": CACHE_CONTROL, "ETag": asset.etag, **(extra_headers or {})}
    if asset.etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
async def dashboard(request: Request) -> Response:
    page = static_file(PAGE, "text/html; charset=utf-8")
    return _respond(request, page, {"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@router.get("/static/{name}")
async def dashboard_asset(request: Request, name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise not_found("file")
    return _respond(request, static_file(name, media_type))
