"""``GET /v1/jobs/{id}/events``: Server-Sent Events of a job's state, so dashboards need not poll.

The stream is built from the job store (the single source of truth), read every
``settings.events_poll_seconds`` in a worker thread; it works the same with the
SQLite and the Redis store and with any number of gateways. Every event carries
the whole job document (exactly the body of ``GET /v1/jobs/{id}``), so a client
that missed events loses nothing: the latest event is the whole truth.

Events:

* ``event: job`` — sent at once, then whenever status, stage, progress, attempts or
  the cancel flag change. Its ``id`` names that state; the stream ends after the
  event of a finished job (succeeded, failed or cancelled).
* ``event: deleted`` — the job was deleted while the stream was open; the stream ends.
* ``: keep-alive`` comments every ``KEEP_ALIVE_SECONDS`` so proxies keep the connection.

Resuming: a client that reconnects with ``Last-Event-ID`` gets no event for the
state it already has. For a finished job whose final state it already has, the
answer is ``204 No Content`` — the SSE way of saying "do not reconnect".
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from compactor.documents import job_json
from compactor.jobs import Job
from compactor.store.base import StoreUnavailable
from service.deps import JobDep, Resources, SettingsDep, TenantDep
from service.errors import problem_responses

log = logging.getLogger("service")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEP_ALIVE_SECONDS = 15.0
# Reconnect delay suggested to clients (SSE `retry:` field), in milliseconds.
RECONNECT_MILLISECONDS = 2000
EVENT_STREAM = "text/event-stream"


def _event_of(name: str, data_schema: dict[str, object]) -> dict[str, object]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data_schema},
            "id": {"type": "string"},
        },
    }


# The schema of each event of the stream (as OpenAPI 3.2's itemSchema; the convention for
# text/event-stream that tools such as Schemathesis validate every event against).
EVENT_SCHEMA: dict[str, object] = {
    "oneOf": [
        _event_of("job", {"$ref": "#/components/schemas/JobOut"}),
        _event_of("deleted", {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}),
    ]
}


def state_id(job: Job) -> str:
    """Names what an event shows: equal ids ⇔ nothing a client sees has changed."""
    cancel = "c" if job.cancel_requested else ""
    return f"{job.attempts}.{job.status.value}.{job.stage.value if job.stage else '-'}.{job.progress:.6f}{cancel}"


def job_event(job: Job) -> bytes:
    data = job_json(job)
    # The serialized JSON never holds a raw newline, so one `data:` line carries it.
    return b"id: " + state_id(job).encode() + b"\nevent: job\ndata: " + data + b"\n\n"


def deleted_event(job_id: str) -> bytes:
    return b'event: deleted\ndata: {"id": "' + job_id.encode() + b'"}\n\n'


async def _job_states(
    request: Request, resources: Resources, first: Job, tenant: str, last_event_id: str | None, poll_seconds: float
) -> AsyncIterator[bytes]:
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n".encode()
    sent = last_event_id
    job: Job | None = first
    quiet_since = time.monotonic()
    while True:
        if job is None:
            yield deleted_event(first.id)
            return
        current = state_id(job)
        if current != sent:
            yield job_event(job)
            sent = current
            quiet_since = time.monotonic()
        if job.finished:
            return
        if time.monotonic() - quiet_since >= KEEP_ALIVE_SECONDS:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        await anyio.sleep(poll_seconds)
        if await request.is_disconnected():
            return
        try:
            job = await run_in_threadpool(resources.store.get_job, first.id, tenant)
        except StoreUnavailable as exc:
            # The stream stays open: the store usually comes back, and the next read catches up.
            log.warning("events for job %s: store unavailable (%s); retrying", first.id, exc)


@router.get(
    "/{job_id}/events",
    summary="Live job state as Server-Sent Events",
    description="`event: job` with the whole job document at once and on every change of status, stage, "
    "progress or attempts; the stream ends after the job finishes (or with `event: deleted`). Reconnect with "
    "`Last-Event-ID` to skip the state you have; a finished job whose final state you have answers 204.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {EVENT_STREAM: {"schema": EVENT_SCHEMA}}, "description": "An event stream"},
        204: {"description": "The job has finished and `Last-Event-ID` already names its final state"},
        **problem_responses(401, 404),
    },
)
async def job_events(
    job: JobDep,
    tenant: TenantDep,
    request: Request,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=200)] = None,
) -> Response:
    if job.finished and last_event_id == state_id(job):
        return Response(status_code=204)
    resources: Resources = request.app.state.resources
    stream = _job_states(request, resources, job, tenant, last_event_id, settings.events_poll_seconds)
    # no-cache: a proxy must not serve one client's stream to another; X-Accel-Buffering: nginx
    # would otherwise hold events back until its buffer fills.
    return StreamingResponse(stream, media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
