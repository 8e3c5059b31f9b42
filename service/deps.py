"""FastAPI dependencies: ``SettingsDep``, ``StoreDep``, ``StorageDep``, ``QueueDep``, ``TenantDep``, ``JobDep``.

The store, storage, queue and key ring are built once per app (``Resources``, on
``app.state``) from the app's ``Settings``. Sync dependencies run in FastAPI's
threadpool, so blocking store reads never run on the event loop.
"""

from __future__ import annotations

import re
import threading
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from compactor.jobs import Job
from compactor.queue import CeleryJobQueue, JobQueue
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from service.auth import DEFAULT_TENANT, KeyRing, bearer_token
from service.errors import ApiError, not_found

ID_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"
_ID_RE = re.compile(ID_PATTERN)


class Resources:
    """The app's store, storage, queue and key ring; the store and queue open on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = KeyRing.from_settings(settings)
        self._lock = threading.Lock()
        self._store: JobStore | None = None
        self._storage: LocalStorage | None = None
        self._queue: JobQueue | None = None

    @property
    def store(self) -> JobStore:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings.effective_store_url)
            return self._store

    @property
    def storage(self) -> LocalStorage:
        with self._lock:
            if self._storage is None:
                self._storage = LocalStorage(self.settings.resolved_data_dir)
            return self._storage

    @property
    def queue(self) -> JobQueue:
        with self._lock:
            if self._queue is None:
                self._queue = CeleryJobQueue(self.settings)
            return self._queue

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            close_queue = getattr(self._queue, "close", None)
            if close_queue is not None:
                close_queue()
            self._queue = None


# These are async on purpose: they only read app state, and a sync dependency costs a
# threadpool round trip on every request (it dominated the status-poll latency).
async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


async def get_app_settings(request: Request) -> Settings:
    """This app's settings (``create_app(settings)``); tests build apps on their own."""
    settings: Settings = request.app.state.settings
    return settings


ResourcesDep = Annotated[Resources, Depends(get_resources)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_store(resources: ResourcesDep) -> JobStore:
    # Sync: the first call opens the store (blocking I/O), so it runs in the threadpool.
    return resources.store


def get_storage(resources: ResourcesDep) -> LocalStorage:
    return resources.storage


def get_queue(resources: ResourcesDep) -> JobQueue:
    return resources.queue


StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


async def get_tenant(
    resources: ResourcesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    ring = resources.keyring
    if ring.open_mode:
        return DEFAULT_TENANT
    token = bearer_token(authorization)
    tenant = ring.tenant_for(token)
    if tenant is None:
        challenge = 'Bearer realm="compactor"' if token is None else 'Bearer realm="compactor", error="invalid_token"'
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": challenge},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def valid_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        # Malformed ids cannot exist: same answer as an unknown one (nothing to learn from it).
        raise not_found(what)
    return value


def get_job(
    job_id: Annotated[str, Path(description="The job id returned by POST /v1/jobs.")],
    tenant: TenantDep,
    store: StoreDep,
) -> Job:
    """The tenant's job, or 404 (another tenant's job is 404 too)."""
    valid_id(job_id, "job")
    job = store.get_job(job_id, tenant)
    if job is None:
        raise not_found("job")
    return job


JobDep = Annotated[Job, Depends(get_job)]
