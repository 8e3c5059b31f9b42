"""Prometheus metrics of the gateway, and ``GET /metrics``.

Three sources, one scrape:

* this process's own series: HTTP request latency by route template (an ASGI
  middleware, so every route is covered, errors included) and upload bytes;
* the job store, read at scrape time (``StoreCollector``): jobs by status, queue
  depth, running jobs per worker. The store is the single source of truth, so any
  gateway answers the same, whichever worker hosts run the jobs;
* under ``compactor serve`` every process of the tree writes to one
  ``PROMETHEUS_MULTIPROC_DIR`` and this endpoint sums them, so the workers' job and
  stage duration histograms (``worker/metrics.py``) show up here too. A distributed
  worker serves its own ``/metrics`` instead (``compactor worker --metrics-port``).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compactor.jobs import JobStatus
from compactor.metrics import local_series_registry
from service.auth import bearer_token
from service.deps import SettingsDep
from service.errors import ApiError

log = logging.getLogger("service")

HTTP_LATENCY = Histogram(
    "compactor_http_request_duration_seconds",
    "Time from request start to the end of the response body, by route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0),
)
HTTP_RESPONSES = Counter("compactor_http_responses_total", "Responses sent, by route template and status code.", ["method", "route", "status"])
UPLOAD_BYTES = Counter("compactor_upload_bytes_total", "Bytes of model and dataset files stored.", ["kind"])
UPLOADS = Counter("compactor_uploads_total", "Model and dataset files stored.", ["kind"])

# Paths that matched no route share one label: raw paths would let any client create series.
UNMATCHED_ROUTE = "unmatched"


def record_upload(kind: str, size_bytes: int) -> None:
    UPLOAD_BYTES.labels(kind).inc(size_bytes)
    UPLOADS.labels(kind).inc()


class RequestMetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it must not buffer or slow the status poll."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - started)
            HTTP_RESPONSES.labels(method, template, str(status)).inc()


def worker_of(lease_owner: str) -> str:
    """The worker's node name from a lease owner ``"<node name>/<pid>/<task id>/<nonce>"``."""
    return lease_owner.split("/", 1)[0]


class StoreCollector(Collector):
    """Job-level gauges read from the job store (and the broker) at each scrape."""

    def __init__(self, resources: Any) -> None:
        self._resources = resources

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily("compactor_store_up", "1 when the job store answered this scrape.")
        try:
            store = self._resources.store
            counts = store.status_counts()
            unfinished = store.unfinished_jobs()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even while the store is down
            log.warning("metrics: the job store did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("compactor_jobs", "Jobs in the store, by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        yield jobs

        running = Tally(worker_of(job.lease_owner) for job in unfinished if job.status is JobStatus.running and job.lease_owner)
        per_worker = GaugeMetricFamily("compactor_running_jobs", "Running jobs, by worker.", labels=["worker"])
        for worker, count in sorted(running.items()):
            per_worker.add_metric([worker], count)
        yield per_worker

        queued = GaugeMetricFamily("compactor_queue_depth", "Jobs waiting for a worker (queued in the store).")
        queued.add_metric([], counts.get(JobStatus.queued, 0))
        yield queued
        depth = self._resources.queue.depth()
        if depth is not None:
            messages = GaugeMetricFamily("compactor_broker_messages", "Task messages waiting in the broker's queue.")
            messages.add_metric([], depth)
            yield messages


def metrics_registry(resources: Any) -> CollectorRegistry:
    """This process's series (or every process's, under ``compactor serve``) plus the store's."""
    registry = local_series_registry()
    registry.register(StoreCollector(resources))
    return registry


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    if settings.metrics_token:
        token = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(token.encode(), settings.metrics_token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "this server's /metrics wants 'Authorization: Bearer <metrics token>'",
                headers={"WWW-Authenticate": 'Bearer realm="compactor-metrics"'},
            )
    registry: CollectorRegistry = request.app.state.metrics_registry
    # Reading the store and the multiprocess files is blocking I/O.
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
