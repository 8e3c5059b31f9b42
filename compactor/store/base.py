"""The job store interface. Two implementations: SQLite (embedded) and Redis (distributed).

Every read and write that a client can cause is scoped to a tenant. Writes that
race between gateway and workers (claim, heartbeat, finish, cancel) are atomic
compare-and-set operations inside the store, never read-modify-write in callers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from compactor.jobs import Job, JobError, JobStatus, Stage, Upload


class StoreUnavailable(Exception):
    """The backing database or server cannot be reached (gateway answers 503)."""


class InvalidCursor(ValueError):
    """A ``list_jobs`` cursor that this store did not hand out (gateway answers 422)."""


class JobStore(Protocol):
    # -- uploads
    def put_upload(self, upload: Upload) -> None: ...
    def get_upload(self, upload_id: str, tenant: str) -> Upload | None: ...
    def delete_upload(self, upload_id: str, tenant: str) -> bool: ...

    # -- jobs, client side (tenant-scoped)
    def create_job(self, job: Job) -> Job:
        """Insert a new queued job. With ``job.idempotency_key`` set and an existing job of the
        same tenant and key, return that job instead (nothing is inserted)."""

    def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        """``tenant=None`` is the worker's unscoped read."""

    def list_jobs(self, tenant: str, *, status: JobStatus | None = None, limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """Newest first; ``cursor`` is opaque; returns (items, next_cursor or None)."""

    def request_cancel(self, job_id: str, tenant: str) -> Job | None:
        """queued → cancelled at once; running → cancel_requested flag (the worker stops at the
        next batch); terminal → unchanged. Returns the job, or None when not found."""

    def delete_job(self, job_id: str, tenant: str) -> bool: ...

    # -- jobs, worker side
    def claim(self, job_id: str, owner: str, lease_seconds: float) -> Job | None:
        """Atomically: a queued job (or a running one whose lease expired) becomes running,
        owned by ``owner`` until now+lease, attempts += 1, started_at set. Returns None when the
        job is missing, terminal, cancel-requested-and-queued, or leased by someone else."""

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float, *, stage: Stage | None, progress: float) -> Job | None:
        """Renew the lease and record stage/progress (progress never decreases within an attempt).
        Returns None when ``owner`` no longer holds the lease (the attempt must stop)."""

    def finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus,
        *,
        error: JobError | None = None,
        metrics: dict[str, Any] | None = None,
        artifacts: list[Any] | None = None,
    ) -> Job | None:
        """running → succeeded|failed|cancelled, only for the lease owner; sets finished_at,
        clears the lease, progress = 1.0 exactly on success. None when the lease was lost."""

    def release(self, job_id: str, owner: str) -> Job | None:
        """Hand a running job back unfinished (its worker is stopping), only for the lease
        owner: running → queued with no owner, and the attempt is not counted (attempts − 1),
        so graceful stops never use up ``max_attempts``. The old lease expiry stays on the
        queued job as a redelivery deadline (see ``requeue_expired``). A job whose cancel was
        requested becomes cancelled instead. None when ``owner`` no longer holds the lease."""

    def requeue_expired(self, now: datetime) -> list[Job]:
        """Running jobs whose lease expired: back to queued when attempts < max_attempts, else
        failed with code ``worker_lost``. Also released jobs that nobody claimed by their
        redelivery deadline (their hand-back message may have died with the worker): they stay
        queued, the deadline is cleared. A job whose cancel was requested ends cancelled.
        Returns every job it changed: the queued ones (the caller sends their messages again) and
        the ones it ended, failed or cancelled (the caller announces their end)."""

    def unfinished_jobs(self) -> list[Job]:
        """Queued and running jobs (used at start-up to re-enqueue what a stop interrupted)."""

    def status_counts(self) -> dict[JobStatus, int]:
        """How many jobs are in each state, over all tenants (every status present, zeros included)."""

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot answer."""

    def close(self) -> None: ...
