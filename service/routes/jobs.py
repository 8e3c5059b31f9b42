"""Jobs: submit, read, list, cancel, delete, download artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from compactor.documents import JobOut
from compactor.jobs import TERMINAL, JobStatus
from compactor.store.base import InvalidCursor
from compactor.webhooks import notify_url_of
from service.deps import JobDep, QueueDep, ResourcesDep, SettingsDep, StorageDep, StoreDep, TenantDep
from service.errors import ApiError, not_found, problem_responses
from service.intake import Submitted, revoke_attempts, submit_json, submit_multipart
from service.schemas import JobList, job_response
from service.uploads import JSON, MULTIPART, check_content_length, media_type, read_json_body, request_budget, unsupported_media_type

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Retrying a submission with the same key returns the job it created instead of a new one.",
    ),
]

_SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "format": "binary", "description": "The model file."},
                        "dataset": {"type": "string", "format": "binary", "description": "Optional dataset file."},
                        "spec": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "description": "Optional job spec as JSON text (schema: JobSpec).",
                        },
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
            JSON: {"schema": {"$ref": "#/components/schemas/JobRequest"}},
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    # A stored report keeps exactly its own fields (compactor/documents.py).
    response_model_exclude_unset=True,
    summary="Create a compression job",
    description="Multipart (`model`, optional `dataset` and `spec`) or JSON naming `model_id`/`dataset_id` of earlier uploads. "
    "Every check runs before the job exists; `Location` names the new job.",
    openapi_extra=_SUBMIT_BODY,
    responses={
        202: {"headers": {"Location": {"description": "/v1/jobs/{id}", "schema": {"type": "string"}}}},
        **problem_responses(400, 401, 404, 413, 415, 422, 503),
    },
)
async def create_job(
    request: Request,
    response: Response,
    settings: SettingsDep,
    resources: ResourcesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    kind = media_type(request)[0]

    def common() -> dict[str, Any]:
        # Resolved in the worker thread: opening the store or storage may block.
        return dict(
            settings=settings,
            storage=resources.storage,
            store=resources.store,
            queue=resources.queue,
            tenant=tenant,
            idempotency_key=idempotency_key,
        )

    submitted: Submitted
    if kind == MULTIPART:
        check_content_length(request, request_budget(settings.max_upload_bytes))
        submitted = await run_in_threadpool(lambda: submit_multipart(request, **common()))
    elif kind == JSON:
        body = await read_json_body(request)
        submitted = await run_in_threadpool(lambda: submit_json(body, **common()))
    else:
        raise unsupported_media_type(request, (MULTIPART, JSON))
    response.headers["Location"] = f"/v1/jobs/{submitted.job.id}"
    return JobOut.of(submitted.job)


@router.get(
    "", response_model=JobList, response_model_exclude_unset=True, summary="The tenant's jobs, newest first", responses=problem_responses(401, 422)
)
def list_jobs(
    store: StoreDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> JobList:
    try:
        jobs, next_cursor = store.list_jobs(tenant, status=status, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise ApiError(422, "invalid_request", str(exc), errors=[{"loc": ["query", "cursor"], "msg": str(exc)}]) from None
    return JobList(items=[JobOut.of(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, response_model_exclude_unset=True, summary="A job", responses=problem_responses(401, 404))
async def get_job(job: JobDep) -> Response:
    # The status poll, the hottest route: one threadpool hop (the store read in JobDep) and
    # the JSON built once here; returning a Response skips FastAPI's response_model pass
    # (which only re-checks what JobOut just built). response_model still documents it.
    return job_response(job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    # A stored report keeps exactly its own fields (compactor/documents.py).
    response_model_exclude_unset=True,
    status_code=202,
    summary="Cancel a queued or running job",
    description="202 when the job was queued (now cancelled) or running (it stops at its next batch); "
    "200 with the job unchanged when it had already finished.",
    responses={200: {"description": "The job had already finished", "model": JobOut}, **problem_responses(401, 404, 503)},
)
def cancel_job(job: JobDep, store: StoreDep, queue: QueueDep, tenant: TenantDep, response: Response) -> JobOut:
    if job.status in TERMINAL:
        response.status_code = 200
        return JobOut.of(job)
    updated = store.request_cancel(job.id, tenant)
    if updated is None:
        raise not_found("job")
    if job.status is JobStatus.queued:
        queue.revoke(job.id, revoke_attempts(job))
    if updated.status is JobStatus.cancelled and notify_url_of(updated) is not None:
        # A queued job ends here, not in a worker: announce it as a worker would (never raises).
        queue.enqueue_notification(updated.id)
    return JobOut.of(updated)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Cancel if needed, then delete the job and its artifacts",
    responses=problem_responses(401, 404, 503),
)
def delete_job(job: JobDep, store: StoreDep, storage: StorageDep, queue: QueueDep, tenant: TenantDep) -> Response:
    if job.status not in TERMINAL:
        store.request_cancel(job.id, tenant)
        queue.revoke(job.id, revoke_attempts(job))
    if not store.delete_job(job.id, tenant):
        raise not_found("job")
    storage.delete_job(job.id)
    return Response(status_code=204)


def _etag_matches(header: str, etag: str) -> bool:
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate in ("*", etag):
            return True
    return False


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    summary="Download an artifact",
    description="`ETag` is the quoted sha256 of the file; `If-None-Match` with it answers 304.",
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **problem_responses(401, 404, 409),
    },
)
def get_artifact(
    job: JobDep,
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="e.g. model.ts, report.json")],
    storage: StorageDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    if job.status is not JobStatus.succeeded:
        raise ApiError(
            409,
            "job_not_finished",
            f"the job is {job.status.value}; artifacts can be downloaded once it has succeeded",
            extra={"job_status": job.status.value},
        )
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        raise not_found("artifact")
    etag = f'"{artifact.sha256}"'
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    path = storage.artifact_path(job.id, artifact.name)
    if not path.is_file():
        raise not_found("artifact file")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=artifact.name, headers={"ETag": etag})
