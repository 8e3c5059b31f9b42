"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ResourcesDep
from service.errors import RETRY_AFTER_SECONDS, problem_response, problem_responses
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: 200 while the process lives")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: the job store, the broker and the artifact storage answer",
    responses=problem_responses(503),
)
async def readyz(request: Request, resources: ResourcesDep) -> Any:
    def check_store() -> None:
        resources.store.ping()

    def check_broker() -> None:
        resources.queue.ping()

    def check_storage() -> None:
        resources.storage.ping()

    checks: dict[str, str] = {}
    for name, probe in (("store", check_store), ("broker", check_broker), ("storage", check_storage)):
        try:
            await run_in_threadpool(probe)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by name
            checks[name] = f"{type(exc).__name__}: {exc}"
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return problem_response(
            request,
            503,
            "not_ready",
            f"not ready: {', '.join(failed)} unavailable",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            extra={"checks": checks},
        )
    depth = await run_in_threadpool(lambda: resources.queue.depth())
    return JSONResponse(Health(status="ok", checks=checks, queue_depth=depth).model_dump())
