"""Redis job store: the distributed default, shared by gateways and workers on many hosts.

Keys (``{p}`` is the namespace, ``compactor`` by default; tenants are
percent-encoded so that no tenant name can reach into another's keys):

    {p}:job:{id}                          the job, whole, as JSON
    {p}:upload:{id}                       an upload record, as JSON
    {p}:tenant:{tenant}:jobs              sorted set of the tenant's job ids, score = created_at in µs
    {p}:tenant:{tenant}:jobs:{status}     the same, per status (for the status filter)
    {p}:tenant:{tenant}:idempotency       hash: idempotency key → job id
    {p}:leases                            sorted set of running job ids, score = lease expiry in µs
                                          (and of handed-back queued ones, score = redelivery deadline)
    {p}:unfinished                        set of queued and running job ids

Equal scores in a sorted set are ordered by member, so "newest first" is
(created_at desc, id desc) exactly as in the SQLite store. Every write that
races is an optimistic WATCH/MULTI transaction: read the job, decide the next
version with the shared rules (which call ``check_transition``), write it and
its index entries in one MULTI; if anyone touched the job in between, EXEC
fails and the decision is made again on the fresh record.

Lease times come from the local clock of each host; leases are tens of seconds,
so NTP-synchronised hosts are plenty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast
from urllib.parse import quote

import redis
from redis import exceptions as redis_errors
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from compactor.jobs import Job, JobError, JobStatus, Stage, Upload, utcnow
from compactor.store import _rules
from compactor.store.base import StoreUnavailable

# Errors that mean "the server cannot serve us now", as opposed to a bug in a command.
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.MasterDownError,
)


class RedisJobStore:
    def __init__(
        self,
        url: str,
        *,
        namespace: str = "compactor",
        socket_timeout_seconds: float = 5.0,
        connect_timeout_seconds: float = 2.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._namespace = namespace
        self._clock = clock
        self._url = url
        # Bounded retries: a blip is ridden out, a dead server becomes StoreUnavailable
        # (a 503) within seconds instead of hanging a gateway thread.
        self._redis: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_seconds,
            socket_connect_timeout=connect_timeout_seconds,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )

    # -- keys

    def _job_key(self, job_id: str) -> str:
        return f"{self._namespace}:job:{job_id}"

    def _upload_key(self, upload_id: str) -> str:
        return f"{self._namespace}:upload:{upload_id}"

    def _tenant_prefix(self, tenant: str) -> str:
        return f"{self._namespace}:tenant:{quote(tenant, safe='')}"

    def _tenant_jobs_key(self, tenant: str, status: JobStatus | None = None) -> str:
        base = f"{self._tenant_prefix(tenant)}:jobs"
        return base if status is None else f"{base}:{status.value}"

    def _idempotency_key(self, tenant: str) -> str:
        return f"{self._tenant_prefix(tenant)}:idempotency"

    @property
    def _leases_key(self) -> str:
        return f"{self._namespace}:leases"

    @property
    def _unfinished_key(self) -> str:
        return f"{self._namespace}:unfinished"

    # -- plumbing

    @contextmanager
    def _available(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"the Redis job store cannot answer: {exc}") from exc

    def _queue_job_write(self, pipe: Pipeline, previous: Job | None, job: Job) -> None:
        """Queue (inside MULTI) the job's record and every index entry that depends on it."""
        created_micros = _rules.to_micros(job.created_at)
        pipe.set(self._job_key(job.id), job.model_dump_json())
        if previous is None:
            pipe.zadd(self._tenant_jobs_key(job.tenant), {job.id: created_micros})
        if previous is None or previous.status is not job.status:
            if previous is not None:
                pipe.zrem(self._tenant_jobs_key(job.tenant, previous.status), job.id)
            pipe.zadd(self._tenant_jobs_key(job.tenant, job.status), {job.id: created_micros})
        if not job.finished and job.lease_expires_at is not None:
            # A running job's lease, or a handed-back queued job's redelivery deadline.
            pipe.zadd(self._leases_key, {job.id: _rules.to_micros(job.lease_expires_at)})
        else:
            pipe.zrem(self._leases_key, job.id)
        if job.finished:
            pipe.srem(self._unfinished_key, job.id)
        else:
            pipe.sadd(self._unfinished_key, job.id)

    def _update_job(self, job_id: str, decide: Callable[[Job], Job | None]) -> tuple[Job | None, bool]:
        """Optimistic read-decide-write of one job. Returns (the job as it now is or None when
        missing, whether it changed)."""
        key = self._job_key(job_id)
        with self._available(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None, False
                    current = Job.model_validate_json(raw)
                    updated = decide(current)
                    if updated is None:
                        return current, False
                    pipe.multi()
                    self._queue_job_write(pipe, current, updated)
                    pipe.execute()
                    return updated, True
                except redis_errors.WatchError:
                    continue

    def _newest_first(self, key: str, newest_micros: int | str, oldest_micros: int | str, count: int | None = None) -> list[tuple[str, float]]:
        """(id, created_at µs) pairs of ``key`` between the two scores, newest first.
        (redis-py types replies loosely; with decode_responses they are str and float.)"""
        reply = self._redis.zrange(
            key,
            newest_micros,
            oldest_micros,
            byscore=True,
            desc=True,
            withscores=True,
            offset=None if count is None else 0,
            num=count,
        )
        return cast(list[tuple[str, float]], reply)

    def _load_jobs(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        raws = self._redis.mget([self._job_key(job_id) for job_id in job_ids])
        return [None if raw is None else Job.model_validate_json(raw) for raw in raws]

    # -- uploads

    def put_upload(self, upload: Upload) -> None:
        with self._available():
            self._redis.set(self._upload_key(upload.id), upload.model_dump_json())

    def get_upload(self, upload_id: str, tenant: str) -> Upload | None:
        with self._available():
            raw = self._redis.get(self._upload_key(upload_id))
        if raw is None:
            return None
        upload = Upload.model_validate_json(raw)
        return upload if upload.tenant == tenant else None

    def delete_upload(self, upload_id: str, tenant: str) -> bool:
        key = self._upload_key(upload_id)
        with self._available(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None or Upload.model_validate_json(raw).tenant != tenant:
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    # -- jobs, client side

    def create_job(self, job: Job) -> Job:
        _rules.check_new_job(job)
        job_key = self._job_key(job.id)
        idempotency_key = self._idempotency_key(job.tenant)
        with self._available(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(job_key, idempotency_key)
                    if job.idempotency_key is not None:
                        existing_id = cast(str | None, pipe.hget(idempotency_key, job.idempotency_key))
                        if existing_id is not None:
                            existing = pipe.get(self._job_key(existing_id))
                            # delete_job removes the key with the job, so the job is there.
                            if existing is not None:
                                return Job.model_validate_json(existing)
                    if pipe.exists(job_key):
                        raise ValueError(f"a job with id {job.id} already exists")
                    pipe.multi()
                    self._queue_job_write(pipe, None, job)
                    if job.idempotency_key is not None:
                        pipe.hset(idempotency_key, job.idempotency_key, job.id)
                    pipe.execute()
                    return job
                except redis_errors.WatchError:
                    continue

    def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        with self._available():
            raw = self._redis.get(self._job_key(job_id))
        if raw is None:
            return None
        job = Job.model_validate_json(raw)
        return job if tenant is None or job.tenant == tenant else None

    def list_jobs(self, tenant: str, *, status: JobStatus | None = None, limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        _rules.check_list_limit(limit)
        wanted_status = JobStatus(status) if status is not None else None
        key = self._tenant_jobs_key(tenant, wanted_status)
        with self._available():
            # (id, created_at µs) pairs, newest first; one extra tells whether another page exists.
            if cursor is None:
                entries = self._newest_first(key, "+inf", "-inf", limit + 1)
            else:
                created_micros, last_id = _rules.decode_cursor(cursor)
                # Jobs created in the same microsecond as the cursor's, after it in id order...
                same_moment = self._newest_first(key, created_micros, created_micros)
                entries = [(job_id, score) for job_id, score in same_moment if job_id < last_id][: limit + 1]
                # ...then strictly older ones.
                if len(entries) <= limit:
                    entries += self._newest_first(key, f"({created_micros}", "-inf", limit + 1 - len(entries))
            page = entries[:limit]
            loaded = self._load_jobs([job_id for job_id, _ in page])
        # A job deleted or moved to another status since the index was read is left out
        # rather than shown stale; the cursor still advances past it.
        jobs = [job for job in loaded if job is not None and job.tenant == tenant and (wanted_status is None or job.status is wanted_status)]
        next_cursor = None
        if len(entries) > limit:
            last_id, last_score = page[-1]
            next_cursor = _rules.encode_cursor(int(last_score), last_id)
        return jobs, next_cursor

    def request_cancel(self, job_id: str, tenant: str) -> Job | None:
        def decide(job: Job) -> Job | None:
            return _rules.cancelled(job, self._clock()) if job.tenant == tenant else None

        job, _ = self._update_job(job_id, decide)
        return job if job is not None and job.tenant == tenant else None

    def delete_job(self, job_id: str, tenant: str) -> bool:
        key = self._job_key(job_id)
        with self._available(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return False
                    job = Job.model_validate_json(raw)
                    if job.tenant != tenant:
                        return False
                    idempotency_key = self._idempotency_key(job.tenant)
                    owned_idempotency_key: str | None = None
                    if job.idempotency_key is not None:
                        pipe.watch(idempotency_key)
                        if pipe.hget(idempotency_key, job.idempotency_key) == job.id:
                            owned_idempotency_key = job.idempotency_key
                    pipe.multi()
                    pipe.delete(key)
                    pipe.zrem(self._tenant_jobs_key(job.tenant), job.id)
                    pipe.zrem(self._tenant_jobs_key(job.tenant, job.status), job.id)
                    pipe.zrem(self._leases_key, job.id)
                    pipe.srem(self._unfinished_key, job.id)
                    if owned_idempotency_key is not None:
                        pipe.hdel(idempotency_key, owned_idempotency_key)
                    pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    # -- jobs, worker side

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> Job | None:
        job, changed = self._update_job(job_id, lambda job: _rules.claimed(job, owner, lease_seconds, self._clock()))
        return job if changed else None

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float, *, stage: Stage | None, progress: float) -> Job | None:
        job, changed = self._update_job(
            job_id,
            lambda job: _rules.heartbeaten(job, owner, lease_seconds, self._clock(), stage=stage, progress=progress),
        )
        return job if changed else None

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
        job, changed = self._update_job(
            job_id,
            lambda job: _rules.finished(job, owner, JobStatus(status), self._clock(), error=error, metrics=metrics, artifacts=artifacts),
        )
        return job if changed else None

    def release(self, job_id: str, owner: str) -> Job | None:
        job, changed = self._update_job(job_id, lambda job: _rules.released(job, owner, self._clock()))
        return job if changed else None

    def requeue_expired(self, now: datetime) -> list[Job]:
        with self._available():
            expired_ids = cast(list[str], self._redis.zrange(self._leases_key, "-inf", _rules.to_micros(now), byscore=True))
        changed_jobs: list[Job] = []
        for job_id in expired_ids:
            job, changed = self._update_job(job_id, lambda job: _rules.after_lease_expiry(job, now))
            if job is None:
                # Deleted while running: drop its stale lease entry.
                with self._available():
                    self._redis.zrem(self._leases_key, job_id)
            elif changed:
                changed_jobs.append(job)
        return changed_jobs

    def unfinished_jobs(self) -> list[Job]:
        with self._available():
            job_ids = sorted(cast(set[str], self._redis.smembers(self._unfinished_key)))
            loaded = self._load_jobs(job_ids)
        jobs = [job for job in loaded if job is not None and not job.finished]
        return sorted(jobs, key=lambda job: (job.created_at, job.id))

    def status_counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        with self._available():
            # One index per tenant and status; tenants are few, so a SCAN per scrape is cheap.
            keys = {
                status: list(self._redis.scan_iter(match=self._tenant_jobs_key("*", status).replace("%2A", "*"), count=500)) for status in JobStatus
            }
            pipe = self._redis.pipeline(transaction=False)
            for status in JobStatus:
                for key in keys[status]:
                    pipe.zcard(key)
            sizes = iter(pipe.execute())
            for status in JobStatus:
                counts[status] = sum(int(next(sizes)) for _ in keys[status])
        return counts

    def ping(self) -> None:
        with self._available():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()
