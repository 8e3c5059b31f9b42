"""The job-store rules both implementations share, as pure functions (no I/O).

Each store reads the current record inside its own atomic section (an SQLite
``BEGIN IMMEDIATE`` transaction, a Redis ``WATCH``/``MULTI`` transaction), asks
one of these functions for the next record, and writes it back only if the
function returned one. Keeping the rules here means SQLite and Redis cannot
drift apart, and every status change passes through ``check_transition``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from compactor.jobs import TERMINAL, Artifact, Job, JobError, JobStatus, Stage, check_transition
from compactor.store.base import InvalidCursor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)

# Progress reaches 1.0 exactly when a job succeeds, so a heartbeat can never
# report it: a client seeing 1.0 on a running job would believe it is done.
MAX_PROGRESS_WHILE_RUNNING = 0.999

WORKER_LOST = "worker_lost"
MAX_LIST_LIMIT = 1000


def as_utc(moment: datetime) -> datetime:
    # Naive datetimes only come from careless callers; the whole project speaks UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def to_micros(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (float timestamps lose the last digits)."""
    return (as_utc(moment) - _EPOCH) // _ONE_MICROSECOND


def encode_cursor(created_micros: int, job_id: str) -> str:
    """The cursor after the job created at ``created_micros`` (see ``to_micros``) with ``job_id``."""
    raw = json.dumps([created_micros, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(created_at in microseconds, job id) of the last item of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_micros, job_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("the cursor is not one this service returned") from exc
    if not isinstance(created_micros, int) or isinstance(created_micros, bool) or not isinstance(job_id, str):
        raise InvalidCursor("the cursor is not one this service returned")
    return created_micros, job_id


def check_list_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}")


def check_new_job(job: Job) -> None:
    if job.status is not JobStatus.queued:
        raise ValueError(f"a new job must be queued, not {job.status.value}")


def _check_lease_seconds(lease_seconds: float) -> None:
    if not (math.isfinite(lease_seconds) and lease_seconds > 0):
        raise ValueError(f"lease_seconds must be a positive number, not {lease_seconds!r}")


def lease_expired(job: Job, now: datetime) -> bool:
    return job.lease_expires_at is None or as_utc(job.lease_expires_at) <= as_utc(now)


def claimed(job: Job, owner: str, lease_seconds: float, now: datetime) -> Job | None:
    """The job as ``owner``'s new attempt, or None when it may not be claimed now."""
    _check_lease_seconds(lease_seconds)
    if not owner:
        raise ValueError("a lease owner must be named")
    if job.cancel_requested:
        return None
    if job.status is JobStatus.running:
        # An expired lease may be taken over, but not past the attempt budget:
        # requeue_expired fails such a job with worker_lost instead.
        if not lease_expired(job, now) or job.attempts >= job.max_attempts:
            return None
    elif job.status is JobStatus.queued:
        check_transition(job.status, JobStatus.running)
    else:
        return None
    return job.model_copy(
        update={
            "status": JobStatus.running,
            "lease_owner": owner,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "attempts": job.attempts + 1,
            "started_at": now,
            # A new attempt starts over, so its progress does too.
            "stage": None,
            "progress": 0.0,
            "updated_at": now,
        }
    )


def _holds_lease(job: Job, owner: str) -> bool:
    # Ownership, not the clock, decides: while nobody has taken the job over (claim
    # or requeue_expired both replace the owner), the late owner's attempt is still the only one.
    return job.status is JobStatus.running and job.lease_owner == owner


def heartbeaten(job: Job, owner: str, lease_seconds: float, now: datetime, *, stage: Stage | None, progress: float) -> Job | None:
    _check_lease_seconds(lease_seconds)
    if not math.isfinite(progress):
        raise ValueError(f"progress must be a finite number, not {progress!r}")
    if not _holds_lease(job, owner):
        return None
    bounded_progress = min(max(progress, 0.0), MAX_PROGRESS_WHILE_RUNNING)
    return job.model_copy(
        update={
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "stage": stage if stage is not None else job.stage,
            "progress": max(job.progress, bounded_progress),
            "updated_at": now,
        }
    )


def _artifact(value: Any) -> Artifact:
    return value if isinstance(value, Artifact) else Artifact.model_validate(value)


def finished(
    job: Job,
    owner: str,
    status: JobStatus,
    now: datetime,
    *,
    error: JobError | None,
    metrics: dict[str, Any] | None,
    artifacts: Iterable[Any] | None,
) -> Job | None:
    if status not in TERMINAL:
        raise ValueError(f"finish needs succeeded, failed or cancelled, not {status.value}")
    if not _holds_lease(job, owner):
        return None
    check_transition(job.status, status)
    update: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "error": error,
    }
    if status is JobStatus.succeeded:
        update["progress"] = 1.0
    if metrics is not None:
        update["metrics"] = metrics
    if artifacts is not None:
        update["artifacts"] = [_artifact(item) for item in artifacts]
    return job.model_copy(update=update)


def released(job: Job, owner: str, now: datetime) -> Job | None:
    """The job handed back unfinished by ``owner`` (its worker is stopping), or None when
    ``owner`` does not hold its lease.

    The attempt is not counted: ``attempts`` goes back down by one, so a graceful stop never
    uses up ``max_attempts`` (only attempts that crashed or stopped answering do). The job is
    queued again, with no owner; its ``lease_expires_at`` is kept as a *redelivery deadline*:
    the stopping worker gives its message back to the broker, and should that message be lost
    with the worker, ``after_lease_expiry`` lets a reaper send the job again once the deadline
    passes without a claim. A cancel asked for meanwhile is honoured: the job ends cancelled.
    """
    if not _holds_lease(job, owner):
        return None
    update: dict[str, Any] = {"lease_owner": None, "updated_at": now}
    if job.cancel_requested:
        check_transition(job.status, JobStatus.cancelled)
        return job.model_copy(update={**update, "status": JobStatus.cancelled, "finished_at": now, "lease_expires_at": None})
    check_transition(job.status, JobStatus.queued)
    return job.model_copy(
        update={
            **update,
            "status": JobStatus.queued,
            "attempts": max(job.attempts - 1, 0),
            # The next attempt starts over; a queued job never shows a stale stage.
            "stage": None,
            "progress": 0.0,
            "lease_expires_at": job.lease_expires_at or now,
        }
    )


def cancelled(job: Job, now: datetime) -> Job | None:
    """The job after a client's cancel, or None when nothing changes (it already finished
    or a cancel is already pending)."""
    if job.status is JobStatus.queued:
        check_transition(job.status, JobStatus.cancelled)
        return job.model_copy(
            update={
                "status": JobStatus.cancelled,
                "finished_at": now,
                "updated_at": now,
                "cancel_requested": True,
                # A handed-back job's redelivery deadline (see ``released``) has nothing left to guard.
                "lease_expires_at": None,
            }
        )
    if job.status is JobStatus.running and not job.cancel_requested:
        # The worker owns a running job; it sees the flag at its next heartbeat and
        # finishes the job as cancelled itself, so no two writers fight over it.
        return job.model_copy(update={"cancel_requested": True, "updated_at": now})
    return None


def handed_back_unclaimed(job: Job, now: datetime) -> bool:
    """A job ``released`` by its worker that no worker claimed before its redelivery deadline."""
    return job.status is JobStatus.queued and job.lease_expires_at is not None and lease_expired(job, now)


def after_lease_expiry(job: Job, now: datetime) -> Job | None:
    """What a running job whose lease expired becomes, or None when its lease is alive.

    A handed-back queued job past its redelivery deadline stays queued with the deadline
    cleared: it is returned so that the caller sends its message again (once)."""
    if handed_back_unclaimed(job, now):
        return job.model_copy(update={"lease_expires_at": None, "updated_at": now})
    if job.status is not JobStatus.running or not lease_expired(job, now):
        return None
    released: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    if job.cancel_requested:
        # Its worker died before it could stop; the client asked for a stop, so that is the outcome.
        check_transition(job.status, JobStatus.cancelled)
        return job.model_copy(update={**released, "status": JobStatus.cancelled, "finished_at": now})
    if job.attempts < job.max_attempts:
        check_transition(job.status, JobStatus.queued)
        return job.model_copy(update={**released, "status": JobStatus.queued, "stage": None, "progress": 0.0})
    check_transition(job.status, JobStatus.failed)
    lost = JobError(
        code=WORKER_LOST,
        message=f"the worker running this job stopped answering on each of its {job.attempts} attempts",
    )
    return job.model_copy(update={**released, "status": JobStatus.failed, "finished_at": now, "error": lost})
