"""FastAPI dependencies: ``SettingsDep``, ``StoreDep``, ``StorageDep``, ``QueueDep``, ``TenantDep``, ``JobDep``.

The store, storage, queue and key ring are built once per app (``Resources``, on
``app.state``) from the app's ``Settings``; the app's lifespan opens them at start-up
(``Resources.open``), and whatever is not open yet (start-up failed, or an app driven
without its lifespan, as in tests) opens on first use in a worker thread.

Every dependency here is async: a sync dependency costs a threadpool round trip per
request, and the status poll used to take three. Blocking work still never runs on the
event loop: ``JobDep`` reads the store in one worker-thread hop (opening it there too
when it is not open yet), and ``StoreDep``/``StorageDep``/``QueueDep`` hop only when
what they return still has to be opened.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from compactor.jobs import Job
from compactor.queue import CeleryJobQueue, JobQueue
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from service.auth import DEFAULT_TENANT, KeyRing, bearer_token
from service.errors import ApiError, not_found

log = logging.getLogger("service")

ID_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"
_ID_RE = re.compile(ID_PATTERN)


class Resources:
    """The app's store, storage, queue and key ring: opened by ``open()`` at start-up, else on first use."""

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

    # What is open already, without opening anything (never blocks; None if not open yet).
    @property
    def opened_store(self) -> JobStore | None:
        return self._store

    @property
    def opened_storage(self) -> LocalStorage | None:
        return self._storage

    @property
    def opened_queue(self) -> JobQueue | None:
        return self._queue

    def open(self) -> None:
        """Open the store, storage and queue now (blocking; the lifespan runs it in a thread).

        Best effort: what cannot be opened yet is logged and left to open on first use, so a
        store or storage that is down at start-up gives 503s and a failing /readyz, as before,
        not a gateway that refuses to start."""
        for name in ("store", "storage", "queue"):
            try:
                getattr(self, name)
            except Exception as exc:  # noqa: BLE001 - retried on first use, where it becomes a 503
                log.warning("could not open the %s at start-up (retried on first use): %s", name, exc)

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


async def get_store(resources: ResourcesDep) -> JobStore:
    # Opening the store is blocking I/O: only then is there a threadpool hop.
    opened = resources.opened_store
    return opened if opened is not None else await run_in_threadpool(lambda: resources.store)


async def get_storage(resources: ResourcesDep) -> LocalStorage:
    opened = resources.opened_storage
    return opened if opened is not None else await run_in_threadpool(lambda: resources.storage)


async def get_queue(resources: ResourcesDep) -> JobQueue:
    opened = resources.opened_queue
    return opened if opened is not None else await run_in_threadpool(lambda: resources.queue)


StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


async def get_tenant(request: Request) -> str:
    """The tenant of the request's API key, or 401.

    Reads the ``Authorization`` header and the key ring straight off the request: every
    parameter and sub-dependency FastAPI resolves costs CPU on every request, and this runs
    on all of them (the header was never in the OpenAPI document)."""
    ring: KeyRing = request.app.state.resources.keyring
    if ring.open_mode:
        return DEFAULT_TENANT
    token = bearer_token(request.headers.get("authorization"))
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


async def get_job(
    job_id: Annotated[str, Path(description="The job id returned by POST /v1/jobs.")],
    tenant: TenantDep,
    request: Request,
) -> Job:
    """The tenant's job, or 404 (another tenant's job is 404 too).

    One threadpool hop: the store read (and opening the store, if it is not open yet)."""
    valid_id(job_id, "job")
    resources: Resources = request.app.state.resources
    job = await run_in_threadpool(lambda: resources.store.get_job(job_id, tenant))
    if job is None:
        raise not_found("job")
    return job


JobDep = Annotated[Job, Depends(get_job)]
