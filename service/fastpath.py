"""The status poll's fast path: ``GET /v1/jobs/{id}`` answered below FastAPI when it succeeds.

Dashboards and pipelines poll this route far more than all others together, and
on a small machine that shares its cores with training, FastAPI's per-request
machinery (routing through every route, dependency resolution, the middleware
stack) was most of the gateway's CPU per poll and so of the poll's tail latency.

This ASGI wrapper recognises the route by its path, authenticates exactly as
``service.deps.get_tenant`` does (same key ring), reads the job with the same
tenant-scoped store call in a worker thread, and sends the very bytes the FastAPI
route would (``compactor.documents.job_json``). It only ever answers **200**:
every other outcome — no or a bad key, a malformed or unknown id, another
tenant's job, a store that is down, any exception — is handed, untouched, to the
full application, which produces its usual problem+json answer. So errors,
headers and auth behaviour cannot drift from the documented route; only the
success path is short. The route stays declared in FastAPI for the OpenAPI
document and as the fallback.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from compactor.documents import job_json
from compactor.jobs import Job
from service.auth import DEFAULT_TENANT, KeyRing, bearer_token
from service.deps import ID_PATTERN
from service.metrics import HTTP_LATENCY, HTTP_RESPONSES

log = logging.getLogger("service")

ROUTE_TEMPLATE = "/v1/jobs/{job_id}"
_JOB_PATH = re.compile(r"^/v1/jobs/(" + ID_PATTERN.removeprefix("^").removesuffix("$") + r")$")


def _authorization(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


class JobPollFastPath:
    def __init__(self, app: ASGIApp, fastapi_app: Any) -> None:
        self.app = app
        self.state = fastapi_app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        match = _JOB_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body = await self._job_body(scope, match.group(1))
        if body is None:
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        HTTP_LATENCY.labels("GET", ROUTE_TEMPLATE).observe(time.perf_counter() - started)
        HTTP_RESPONSES.labels("GET", ROUTE_TEMPLATE, "200").inc()

    async def _job_body(self, scope: Scope, job_id: str) -> bytes | None:
        """The 200 body, or None for every case the full application must answer."""
        resources = self.state.resources
        ring: KeyRing = resources.keyring
        if ring.open_mode:
            tenant: str | None = DEFAULT_TENANT
        else:
            tenant = ring.tenant_for(bearer_token(_authorization(scope)))
        store = resources.opened_store
        if tenant is None or store is None:
            return None
        try:
            job: Job | None = await run_in_threadpool(store.get_job, job_id, tenant)
        except Exception:  # noqa: BLE001 - the full application reports it (503 for a store that is down)
            return None
        if job is None:
            return None
        return job_json(job)
