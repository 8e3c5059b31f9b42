"""The job queue: how the gateway hands a job id to the workers (Celery, by task NAME).

The gateway never imports the worker: it sends ``compactor.run_job`` with ``args=[job_id]``
through a Celery *client* app, and ``compactor.notify_job`` (the job-end webhook) the same
way when it cancels a queued job. ``celery_config(settings)`` is the one place the Celery
settings live; the worker builds its app from the same function so that producer and
consumer always agree (broker, transport folders, queue, acks, time limits).

Embedded default: Celery's ``filesystem://`` broker with its folders under
``data_dir/broker/``. Messages are written to and read from the same folder
(``data_folder_in == data_folder_out``) so a producer and a consumer meet there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from celery import Celery

from compactor.fs_broker import TRANSPORT_PATH
from compactor.settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "compactor.run_job"
# The job-end webhook (spec.notify.url): sent by whoever ended the job, the worker or the gateway.
NOTIFY_TASK_NAME = "compactor.notify_job"
# A failed send of the webhook message is retried this briefly: the job's outcome is already
# recorded and nothing about it may wait for the broker.
_NOTIFY_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3}


class BrokerUnavailable(Exception):
    """The message broker cannot be reached (gateway answers 503)."""


class JobQueue(Protocol):
    def enqueue(self, job_id: str, attempt: int = 1) -> str:
        """Send the job to the workers; returns the Celery task id ``<job_id>-<attempt>``."""

    def enqueue_notification(self, job_id: str) -> bool:
        """Send ``compactor.notify_job`` for a job that just ended; False (logged) when it could
        not be sent. Never raises: a webhook must not fail or delay the job's own outcome."""

    def revoke(self, job_id: str, attempts: int = 1) -> None:
        """Best effort: revoke the tasks of attempts 1..attempts (the store's state is the real guard)."""

    def ping(self) -> None:
        """Raise BrokerUnavailable when the broker cannot be reached."""

    def depth(self) -> int | None:
        """Messages waiting in the queue, or None when the broker cannot tell."""


def task_id_for(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def notify_queue_name(settings: Settings) -> str:
    """Webhooks have a queue of their own, consumed by ``compactor notifier`` (a thread pool, no
    torch): on the job queue a delivery would wait behind every queued job, since a job worker
    runs one task at a time, and its retries behind whatever job that worker took next."""
    return f"{settings.queue_name}.notify"


def notify_task_id(job_id: str) -> str:
    return f"{job_id}-notify"


def is_filesystem_broker(url: str) -> bool:
    return url.startswith("filesystem://")


def broker_folders(settings: Settings) -> dict[str, Path]:
    """The filesystem broker's folders under ``data_dir/broker/`` (messages, control, processed)."""
    root = settings.resolved_data_dir / "broker"
    return {"messages": root / "messages", "control": root / "control", "processed": root / "processed"}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration shared by the gateway (producer) and the worker (consumer)."""
    url = settings.effective_broker_url
    transport_options: dict[str, Any]
    if is_filesystem_broker(url):
        folders = broker_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        messages = str(folders["messages"])
        transport_options = {
            "data_folder_in": messages,
            "data_folder_out": messages,
            # kombu's name for it; processed messages are not kept (store_processed=False).
            "processed_folder": str(folders["processed"]),
            "data_folder_processed": str(folders["processed"]),
            "store_processed": False,
            # Exchange tables (fanout for remote control, e.g. revoke); kombu's default is ./control.
            "control_folder": str(folders["control"]),
            # kombu sleeps this long after an empty poll (default 1 s): it bounds submit → running.
            "polling_interval": 0.1,
        }
    else:
        transport_options = {
            # Must exceed the hard limit or Redis re-delivers a task that is still running.
            "visibility_timeout": int(settings.job_hard_time_limit + 600),
        }
    return {
        "broker_url": url,
        # The filesystem transport with atomic message writes (compactor/fs_broker.py says why).
        **({"broker_transport": TRANSPORT_PATH} if is_filesystem_broker(url) else {}),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_hard_time_limit,
        "task_default_queue": settings.queue_name,
        "task_routes": {TASK_NAME: {"queue": settings.queue_name}, NOTIFY_TASK_NAME: {"queue": notify_queue_name(settings)}},
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings, name: str = "compactor") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def send_notification(app: Celery, settings: Settings, job_id: str) -> bool:
    """Enqueue ``compactor.notify_job(job_id)`` on ``app`` (the gateway's client app or the worker's
    own); returns False and logs when the broker refused it. Never raises."""
    try:
        app.send_task(
            NOTIFY_TASK_NAME,
            args=[job_id],
            queue=notify_queue_name(settings),
            task_id=notify_task_id(job_id),
            retry=True,
            retry_policy=_NOTIFY_RETRY_POLICY,
        )
    except Exception as exc:  # noqa: BLE001 - kombu/redis raise many kinds; the job's outcome stands
        log.error("job %s: the job-end webhook could not be enqueued and will not be sent: %s: %s", job_id, type(exc).__name__, exc)
        return False
    return True


class CeleryJobQueue:
    """``JobQueue`` over a Celery client app (no task code is imported)."""

    def __init__(self, settings: Settings, *, connect_timeout: float = 3.0) -> None:
        self.settings = settings
        self.app = make_celery(settings, name="compactor-gateway")
        self._connect_timeout = connect_timeout

    def enqueue(self, job_id: str, attempt: int = 1) -> str:
        task_id = task_id_for(job_id, attempt)
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id],
                queue=self.settings.queue_name,
                task_id=task_id,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
        except Exception as exc:  # kombu/redis raise many kinds when the broker is down
            raise BrokerUnavailable(f"cannot enqueue job {job_id}: {type(exc).__name__}: {exc}") from exc
        return task_id

    def enqueue_notification(self, job_id: str) -> bool:
        return send_notification(self.app, self.settings, job_id)

    def revoke(self, job_id: str, attempts: int = 1) -> None:
        ids = [task_id_for(job_id, n) for n in range(1, max(attempts, 1) + 1)]
        try:
            self.app.control.revoke(ids)
        except Exception as exc:  # noqa: BLE001 - best effort; the store's cancel flag is authoritative
            log.warning("revoke of %s failed: %s", ids, exc)

    def ping(self) -> None:
        url = self.settings.effective_broker_url
        if is_filesystem_broker(url):
            folder = broker_folders(self.settings)["messages"]
            if not folder.is_dir():
                raise BrokerUnavailable(f"broker folder {folder.name!r} is missing")
            try:
                probe = folder / ".ping"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise BrokerUnavailable(f"broker folder is not writable: {exc.strerror}") from exc
            return
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=self._connect_timeout)
        except Exception as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc

    def depth(self) -> int | None:
        try:
            with self.app.connection_for_read() as conn:
                result = conn.default_channel.queue_declare(queue=self.settings.queue_name, passive=True)
                return int(result.message_count)
        except Exception as exc:  # noqa: BLE001 - depth is informational
            log.debug("queue depth unavailable: %s", exc)
            return None

    def close(self) -> None:
        self.app.close()
