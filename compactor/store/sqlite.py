"""SQLite job store: the embedded default, shared by the gateway and local worker processes.

One file, WAL journal (readers never block the writer), one connection per
thread and per process (the gateway calls the store from a threadpool, the
worker from other processes; an SQLite connection must never cross a fork).
Every write that races runs inside ``BEGIN IMMEDIATE``: it takes the database's
write lock before reading, so the read-decide-write of a claim is one atomic
step across all processes, and a second claimer sees the first one's result.

Each job is stored whole as JSON in ``doc`` (so fields added to ``Job`` later
round-trip without a migration); the columns beside it are the ones queries
filter and sort on, and are always written together with ``doc``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from compactor.jobs import Job, JobError, JobStatus, Stage, Upload, utcnow
from compactor.store import _rules
from compactor.store.base import StoreUnavailable

_SCHEMA_VERSION = 1

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id               TEXT PRIMARY KEY,
        tenant           TEXT NOT NULL,
        status           TEXT NOT NULL,
        created_us       INTEGER NOT NULL,
        lease_expires_us INTEGER,
        idempotency_key  TEXT,
        doc              TEXT NOT NULL
    )""",
    # Newest-first keyset pagination, per tenant, with and without a status filter.
    "CREATE INDEX IF NOT EXISTS jobs_by_tenant_created ON jobs (tenant, created_us DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_tenant_status_created ON jobs (tenant, status, created_us DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status_lease ON jobs (status, lease_expires_us)",
    """CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS uploads (
        id         TEXT PRIMARY KEY,
        tenant     TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        doc        TEXT NOT NULL
    )""",
)

_JOB_COLUMNS = "id, tenant, status, created_us, lease_expires_us, idempotency_key, doc"


class SQLiteJobStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_seconds: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_seconds = busy_timeout_seconds
        self._clock = clock
        self._local = threading.local()
        self._connections_lock = threading.Lock()
        # Every connection with the thread that uses it, so close() can close them all and
        # connections of threads that have ended (threadpools retire idle threads) are closed.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        # Connections a forked child inherited: never used and never closed there (closing
        # them could disturb the parent's locks and WAL), only kept from being collected.
        self._inherited_connections: list[sqlite3.Connection] = []
        store = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_parent_connections(store))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the directory of the job store {self.path}: {exc}") from exc
        self._create_schema()

    # -- connections

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open_connection()
            self._local.connection = connection
        return connection

    def _after_fork_in_child(self) -> None:
        # SQLite connections must not cross a fork: the child opens its own on first use.
        # The lock is replaced too, since another parent thread may have held it at the fork.
        self._inherited_connections += [connection for _, connection in self._connections]
        self._connections = []
        self._connections_lock = threading.Lock()
        self._local = threading.local()

    def _open_connection(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; each racing write opens
            # its own BEGIN IMMEDIATE. check_same_thread=False only so that close() and the
            # sweep of ended threads can close them; each is still used by one thread only.
            connection = sqlite3.connect(self.path, timeout=self._busy_timeout_seconds, isolation_level=None, check_same_thread=False)
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_seconds * 1000)}")
            # In WAL mode NORMAL cannot corrupt the database; a power cut may only lose
            # the last commits, and leases recover jobs from that.
            connection.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the job store {self.path}: {exc}") from exc
        with self._connections_lock:
            ended = [entry for entry in self._connections if not entry[0].is_alive()]
            self._connections = [entry for entry in self._connections if entry[0].is_alive()]
            self._connections.append((threading.current_thread(), connection))
        for _, stale in ended:
            stale.close()
        return connection

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._connection()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the job store {self.path} cannot answer: {exc}") from exc

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One atomic read-decide-write: the write lock is held from the first read."""
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the job store {self.path} cannot answer: {exc}") from exc
        try:
            yield connection
        except BaseException as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise StoreUnavailable(f"the job store {self.path} cannot answer: {exc}") from exc
            raise
        try:
            connection.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise StoreUnavailable(f"the job store {self.path} cannot commit: {exc}") from exc

    def _create_schema(self) -> None:
        connection = self._connection()
        try:
            # WAL is a property of the file: set once, every later connection uses it.
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreUnavailable(f"the job store {self.path} cannot use WAL mode (got {mode})")
            with self._writing() as conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > _SCHEMA_VERSION:
                    raise StoreUnavailable(f"the job store {self.path} was written by a newer Compactor (schema {version})")
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"cannot open the job store {self.path}: {exc}") from exc

    # -- rows

    @staticmethod
    def _job_row(job: Job) -> tuple[Any, ...]:
        lease_us = _rules.to_micros(job.lease_expires_at) if job.lease_expires_at is not None else None
        return (
            job.id,
            job.tenant,
            job.status.value,
            _rules.to_micros(job.created_at),
            lease_us,
            job.idempotency_key,
            job.model_dump_json(),
        )

    @staticmethod
    def _load_job(row: tuple[Any, ...] | None) -> Job | None:
        return None if row is None else Job.model_validate_json(row[0])

    def _replace_job(self, connection: sqlite3.Connection, job: Job) -> None:
        job_id, _, status, _, lease_expires_us, _, doc = self._job_row(job)
        connection.execute(
            "UPDATE jobs SET status = ?, lease_expires_us = ?, doc = ? WHERE id = ?",
            (status, lease_expires_us, doc, job_id),
        )

    def _update_job(self, job_id: str, decide: Callable[[Job], Job | None]) -> tuple[Job | None, bool]:
        """Read the job under the write lock, let ``decide`` return its next version, write it.
        Returns (the job as it now is or None when missing, whether it changed)."""
        with self._writing() as connection:
            current = self._load_job(connection.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if current is None:
                return None, False
            updated = decide(current)
            if updated is None:
                return current, False
            self._replace_job(connection, updated)
            return updated, True

    # -- uploads

    def put_upload(self, upload: Upload) -> None:
        with self._writing() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO uploads (id, tenant, created_us, doc) VALUES (?, ?, ?, ?)",
                (upload.id, upload.tenant, _rules.to_micros(upload.created_at), upload.model_dump_json()),
            )

    def get_upload(self, upload_id: str, tenant: str) -> Upload | None:
        with self._reading() as connection:
            row = connection.execute("SELECT doc FROM uploads WHERE id = ? AND tenant = ?", (upload_id, tenant)).fetchone()
        return None if row is None else Upload.model_validate_json(row[0])

    def delete_upload(self, upload_id: str, tenant: str) -> bool:
        with self._writing() as connection:
            cursor = connection.execute("DELETE FROM uploads WHERE id = ? AND tenant = ?", (upload_id, tenant))
            return cursor.rowcount > 0

    # -- jobs, client side

    def create_job(self, job: Job) -> Job:
        _rules.check_new_job(job)
        with self._writing() as connection:
            if job.idempotency_key is not None:
                existing = self._load_job(
                    connection.execute(
                        "SELECT doc FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                        (job.tenant, job.idempotency_key),
                    ).fetchone()
                )
                if existing is not None:
                    return existing
            try:
                connection.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", self._job_row(job))
            except sqlite3.IntegrityError as exc:
                # The idempotency key was checked under the same write lock, so only the id can clash.
                raise ValueError(f"a job with id {job.id} already exists") from exc
        return job

    def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        with self._reading() as connection:
            if tenant is None:
                row = connection.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            else:
                row = connection.execute("SELECT doc FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return self._load_job(row)

    def list_jobs(self, tenant: str, *, status: JobStatus | None = None, limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
        _rules.check_list_limit(limit)
        conditions = ["tenant = ?"]
        parameters: list[Any] = [tenant]
        if status is not None:
            conditions.append("status = ?")
            parameters.append(JobStatus(status).value)
        if cursor is not None:
            created_us, last_id = _rules.decode_cursor(cursor)
            conditions.append("(created_us < ? OR (created_us = ? AND id < ?))")
            parameters.extend([created_us, created_us, last_id])
        # One extra row tells whether another page exists without a second query.
        parameters.append(limit + 1)
        query = f"SELECT doc FROM jobs WHERE {' AND '.join(conditions)} ORDER BY created_us DESC, id DESC LIMIT ?"
        with self._reading() as connection:
            rows = connection.execute(query, parameters).fetchall()
        jobs = [Job.model_validate_json(row[0]) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = _rules.encode_cursor(_rules.to_micros(jobs[-1].created_at), jobs[-1].id)
        return jobs, next_cursor

    def request_cancel(self, job_id: str, tenant: str) -> Job | None:
        def decide(job: Job) -> Job | None:
            return _rules.cancelled(job, self._clock()) if job.tenant == tenant else None

        job, _ = self._update_job(job_id, decide)
        return job if job is not None and job.tenant == tenant else None

    def delete_job(self, job_id: str, tenant: str) -> bool:
        with self._writing() as connection:
            cursor = connection.execute("DELETE FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
            return cursor.rowcount > 0

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
        changed: list[Job] = []
        with self._writing() as connection:
            now_us = _rules.to_micros(now)
            # Running jobs whose lease ran out, and handed-back queued ones past their redelivery deadline.
            rows = connection.execute(
                "SELECT doc FROM jobs WHERE (status = ? AND (lease_expires_us IS NULL OR lease_expires_us <= ?))"
                " OR (status = ? AND lease_expires_us <= ?)",
                (JobStatus.running.value, now_us, JobStatus.queued.value, now_us),
            ).fetchall()
            for (doc,) in rows:
                updated = _rules.after_lease_expiry(Job.model_validate_json(doc), now)
                if updated is None:
                    continue
                self._replace_job(connection, updated)
                changed.append(updated)
        return changed

    def unfinished_jobs(self) -> list[Job]:
        with self._reading() as connection:
            rows = connection.execute(
                "SELECT doc FROM jobs WHERE status IN (?, ?) ORDER BY created_us, id",
                (JobStatus.queued.value, JobStatus.running.value),
            ).fetchall()
        return [Job.model_validate_json(doc) for (doc,) in rows]

    def status_counts(self) -> dict[JobStatus, int]:
        with self._reading() as connection:
            rows = connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JobStatus, 0)
        counts.update({JobStatus(status): count for status, count in rows})
        return counts

    def ping(self) -> None:
        try:
            with self._reading() as connection:
                connection.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"the job store {self.path} cannot answer: {exc}") from exc

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for _, connection in connections:
            connection.close()
        self._local = threading.local()


def _forget_parent_connections(store: weakref.ref[SQLiteJobStore]) -> None:
    alive = store()
    if alive is not None:
        alive._after_fork_in_child()
