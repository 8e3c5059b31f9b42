"""RFC 9457 problem details for every error the gateway answers.

Body: ``{"type", "title", "status", "detail", "instance", "code"}`` with
``Content-Type: application/problem+json``; validation errors add
``"errors": [{"loc": [...], "msg": "..."}]``. No handler ever returns a traceback.

    status  code                       raised by
    400     invalid_request            malformed multipart / JSON body, missing part
    401     unauthorized               missing or wrong API key (with WWW-Authenticate: Bearer)
    404     not_found                  unknown id, other tenant's object, unknown route/artifact
    405     method_not_allowed         wrong method on a known path (with Allow)
    409     job_not_finished           artifact download before success
    413     payload_too_large          upload past settings.max_upload_bytes
    415     unsupported_media_type     body neither multipart/form-data nor application/json
    415     unsupported_model_format   compactor.errors.UnsupportedModelFormat
    422     invalid_request            bad query/path parameters
    422     invalid_spec, unsupported_combination, unsafe_model, invalid_model, invalid_dataset
    503     store_unavailable / broker_unavailable / not_ready   (with Retry-After)
    500     internal_error             anything unexpected (logged, no details leaked)
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from compactor.errors import CompactorError
from compactor.queue import BrokerUnavailable
from compactor.spec import error_location
from compactor.store.base import StoreUnavailable

log = logging.getLogger("service.errors")

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 5


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details, plus a stable machine-readable ``code``."""

    type: str = Field(default="about:blank", examples=["https://compactor.dev/problems/not_found"])
    title: str
    status: int
    detail: str
    instance: str
    code: str = Field(examples=["not_found"])
    errors: list[ErrorItem] | None = None


class ApiError(Exception):
    """An error the gateway itself raises; rendered as problem JSON."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors
        self.extra = extra or {}


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


def _loc(parts: Any) -> list[str | int]:
    return [p if isinstance(p, int) else str(p) for p in parts]


def spec_errors(exc: ValidationError, prefix: tuple[str, ...] = ("spec",)) -> list[dict[str, Any]]:
    return [{"loc": [*prefix, *_loc(error_location(e))], "msg": str(e.get("msg", ""))} for e in exc.errors()]


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": _loc(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
    where = ", ".join(".".join(map(str, e["loc"])) for e in errors) or "request"
    return problem_response(request, 422, "invalid_request", f"invalid request parameters: {where}", errors=errors)


async def _spec_validation(request: Request, exc: ValidationError) -> JSONResponse:
    # The only pydantic validation the gateway runs on client input outside FastAPI's own is the spec.
    errors = spec_errors(exc)
    where = ", ".join(".".join(map(str, e["loc"])) for e in errors)
    return problem_response(request, 422, "invalid_spec", f"the job spec is invalid: {where}", errors=errors)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    code = _CODE_BY_STATUS.get(status, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and detail == "Not Found":
        detail = f"no route matches {request.url.path}"
    headers = dict(exc.headers or {})
    if status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return problem_response(request, status, code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts on this path (Starlette names only the first route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.routes):
            methods.add(method)
    return sorted(methods)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return problem_response(request, exc.status, exc.code, exc.detail, headers=exc.headers, errors=exc.errors, extra=exc.extra)


async def _compactor_error(request: Request, exc: CompactorError) -> JSONResponse:
    errors = None
    extra: dict[str, Any] = {}
    if exc.field:
        errors = [{"loc": ["spec", *exc.field.split(".")], "msg": exc.message}]
        extra["field"] = exc.field
    status = exc.status if 400 <= exc.status < 600 else 422
    return problem_response(request, status, exc.code, exc.message, errors=errors, extra=extra)


async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("job store unavailable: %s", exc)
    return problem_response(
        request,
        503,
        "store_unavailable",
        "the job store is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _broker_unavailable(request: Request, exc: BrokerUnavailable) -> JSONResponse:
    log.warning("broker unavailable: %s", exc)
    return problem_response(
        request,
        503,
        "broker_unavailable",
        "the job queue is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "internal_error", "an internal error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ValidationError, _spec_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(CompactorError, _compactor_error)  # type: ignore[arg-type]
    app.add_exception_handler(StoreUnavailable, _store_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(BrokerUnavailable, _broker_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given problem statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return out
