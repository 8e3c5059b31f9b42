"""The job record and its state machine, shared by the gateway and the worker (no torch).

States: queued → running → succeeded | failed | cancelled. A running job whose
lease expired goes back to queued (a new attempt) until ``max_attempts``.
Every transition is checked here, in one place: ``check_transition``.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Stage(StrEnum):
    load = "load"
    score = "score"
    prune = "prune"
    finetune = "finetune"
    quantize = "quantize"
    evaluate = "evaluate"
    benchmark = "benchmark"
    export = "export"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running → queued: the lease expired (worker died) and the job is re-queued for another attempt.
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"a {current.value} job cannot become {target.value}")
        self.current = current
        self.target = target


def check_transition(current: JobStatus, target: JobStatus) -> None:
    if target not in _ALLOWED[current]:
        raise IllegalTransition(current, target)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Opaque URL-safe ids; the prefix tells a job id from a model or dataset id in logs."""
    return f"{prefix}_{secrets.token_urlsafe(12).replace('-', 'x').replace('_', 'y')}"


class JobError(BaseModel):
    code: str
    message: str


class Artifact(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    tenant: str
    status: JobStatus = JobStatus.queued
    stage: Stage | None = None
    progress: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    attempts: int = 0
    max_attempts: int = 3
    spec: dict[str, Any] = Field(default_factory=dict)
    model_id: str
    dataset_id: str | None = None
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    cancel_requested: bool = False
    # Lease: the worker attempt that owns the job and until when; renewed by heartbeat.
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    idempotency_key: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class Upload(BaseModel):
    """A model or dataset file uploaded once and reusable by many jobs."""

    id: str
    tenant: str
    kind: str  # "model" | "dataset"
    format: str
    size_bytes: int
    sha256: str
    num_samples: int | None = None
    # A dataset's facts, inspected once at upload (None in records written before they were kept).
    has_targets: bool | None = None
    input_shape: list[int] | None = None
    created_at: datetime = Field(default_factory=utcnow)
