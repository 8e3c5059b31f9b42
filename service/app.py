"""The FastAPI gateway: ``create_app(settings)``.

Never imports torch or the worker; jobs reach the workers by Celery task name
(``compactor.queue``). Tests build an app on their own ``Settings``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from compactor.settings import Settings, get_settings
from compactor.storage import StorageUnavailable
from service import metrics
from service.deps import Resources
from service.errors import (
    RETRY_AFTER_SECONDS,
    ErrorItem,
    Problem,
    install_error_handlers,
    problem_response,
)
from service.fastpath import JobPollFastPath
from service.metrics import RequestMetricsMiddleware, metrics_registry
from service.routes import dashboard, events, health, jobs, uploads
from service.schemas import JobRequest

log = logging.getLogger("service")

API_DESCRIPTION = """Compactor prunes, fine-tunes and INT8-quantizes PyTorch models.

Authenticate with `Authorization: Bearer <api key>`. Errors are RFC 9457 problem details
(`application/problem+json`) with a stable `code`."""


BEARER_SCHEME = "bearerAuth"


def _declare_bearer_auth(schema: dict[str, Any], *, required: bool) -> None:
    """Say in the document what get_tenant enforces: every /v1 operation needs the bearer key
    (unless the server runs in open mode). Clients and Schemathesis' ignored_auth read it."""
    schema["components"]["securitySchemes"] = {
        BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer <key>`."}
    }
    if not required:
        return
    for path, item in schema["paths"].items():
        if path.startswith("/v1/"):
            for operation in item.values():
                operation["security"] = [{BEARER_SCHEME: []}]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    resources = Resources(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Open the store, storage and queue now (in a thread: it is blocking I/O), so that
        # requests find them open and their dependencies never need a threadpool hop.
        await run_in_threadpool(resources.open)
        yield
        resources.close()

    app = FastAPI(title="Compactor", version="0.1.0", description=API_DESCRIPTION, lifespan=lifespan)
    # SettingsDep reads app.state.settings. Not dependency_overrides: with any override
    # present FastAPI re-resolves every dependency on every request (~4 ms of CPU each).
    app.state.settings = settings
    app.state.resources = resources
    app.state.metrics_registry = metrics_registry(resources)

    install_error_handlers(app)

    async def _storage_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("artifact storage unavailable: %s", exc)
        return problem_response(
            request,
            503,
            "storage_unavailable",
            "the artifact storage is unavailable; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    app.add_exception_handler(StorageUnavailable, _storage_unavailable)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(uploads.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    app.add_middleware(RequestMetricsMiddleware)
    # Outermost: the status poll's success path skips the rest (service/fastpath.py).
    app.add_middleware(JobPollFastPath, fastapi_app=app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema(
                [(Problem, "serialization"), (ErrorItem, "serialization"), (JobRequest, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            _declare_bearer_auth(schema, required=not resources.keyring.open_mode)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
