"""Prometheus series of a worker process: how long jobs and their stages take.

Observed once per finished attempt from the job record the store holds (so the
figures are the ones the API reports). Exposed by ``compactor worker --metrics-port``
on a host of its own, or, under ``compactor serve``, through the gateway's
``/metrics`` (every process of the tree writes to one ``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

from compactor.jobs import Job
from compactor.metrics import local_series_registry
from compactor.store.base import JobStore

log = logging.getLogger(__name__)

# Jobs run from seconds (tiny models) to hours (fine-tuning large ones).
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

JOB_DURATION = Histogram(
    "compactor_job_duration_seconds",
    "Wall time of a job's final attempt, from claim to its terminal state, by outcome.",
    ["status"],
    buckets=JOB_BUCKETS,
)
STAGE_DURATION = Histogram(
    "compactor_stage_duration_seconds",
    "Time spent in each pipeline stage of succeeded jobs (the report's `stages`).",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
JOBS_FINISHED = Counter("compactor_jobs_finished_total", "Jobs this worker brought to a terminal state.", ["status", "code"])


def observe_finished_job(job: Job) -> None:
    code = job.error.code if job.error else ""
    JOBS_FINISHED.labels(job.status.value, code).inc()
    if job.started_at is not None and job.finished_at is not None:
        JOB_DURATION.labels(job.status.value).observe(max(0.0, (job.finished_at - job.started_at).total_seconds()))
    for stage in (job.metrics or {}).get("stages", []):
        if isinstance(stage, dict) and isinstance(stage.get("seconds"), int | float):
            STAGE_DURATION.labels(str(stage.get("name"))).observe(float(stage["seconds"]))


def record_finished_job(store: JobStore, job_id: str) -> None:
    """Observe the job this attempt finished. Metrics must never fail a job: errors are logged."""
    try:
        job = store.get_job(job_id)
        if job is not None and job.finished:
            observe_finished_job(job)
    except Exception as exc:  # noqa: BLE001 - metrics are best effort
        log.warning("metrics for job %s not recorded: %s", job_id, exc)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """This worker's /metrics on its own port (a thread; the worker host is scraped directly)."""
    start_http_server(port, addr=addr, registry=local_series_registry())
    log.info("worker metrics on http://%s:%d/metrics", addr, port)
