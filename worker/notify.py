"""The job-end webhook, worker side: what ``compactor.notify_job`` does with one attempt.

``announce_job_end`` runs in ``compactor.run_job`` once an attempt has ended the job: when
the job asked for a webhook it enqueues ``compactor.notify_job`` (by task name, never
waiting on the broker for long, never raising). The webhook therefore never delays or
changes the job's outcome: it is recorded in the store before anything here runs.

``deliver_job_end`` is one delivery attempt. It re-reads the job and re-checks the
operator's allowlist (settings may have changed since the submission) before any request
is made. ``retry_delay`` says whether and when the task tries again; after the last
attempt an undelivered webhook is logged as an error (the job store keeps no delivery
record: the job's own state is the source of truth, and a receiver can always poll it).
"""

from __future__ import annotations

import logging
from enum import StrEnum

from celery import Celery

from compactor.queue import send_notification
from compactor.settings import Settings
from compactor.store.base import JobStore
from compactor.webhooks import (
    WebhookConfigError,
    backoff_seconds,
    deliver,
    delivery_id_for,
    notify_url_of,
    parse_allowlist,
    payload_for,
    secret_for,
)

log = logging.getLogger(__name__)
# httpx logs every request's full URL at INFO; a tenant's webhook URL may carry a token in its
# path or query (many receivers authenticate that way), so only its warnings reach the logs.
# Our own lines name the job and the outcome, never the URL.
logging.getLogger("httpx").setLevel(logging.WARNING)


class NotifyOutcome(StrEnum):
    delivered = "delivered"  # the receiver answered 2xx
    failed = "failed"  # this attempt did not get through; another may
    dropped = "dropped"  # nothing to send, or never allowed to be sent: no retry helps


def announce_job_end(app: Celery, settings: Settings, store: JobStore, job_id: str) -> bool:
    """Enqueue the job-end webhook if the (now finished) job asked for one. Never raises.

    Returns True when a notification was enqueued."""
    try:
        job = store.get_job(job_id)
    except Exception as exc:  # noqa: BLE001 - the job's outcome is recorded; only the webhook is lost
        log.error("job %s: cannot read the job to announce its end; no webhook is sent: %s", job_id, exc)
        return False
    if job is None or not job.finished or notify_url_of(job) is None:
        return False
    return send_notification(app, settings, job_id)


def deliver_job_end(job_id: str, store: JobStore, settings: Settings, attempt: int) -> NotifyOutcome:
    """One attempt at POSTing the finished job to its ``spec.notify.url``; logs the outcome."""
    try:
        job = store.get_job(job_id)
    except Exception as exc:  # noqa: BLE001 - a store outage is worth another attempt
        log.warning("job %s: webhook attempt %d: cannot read the job: %s", job_id, attempt, exc)
        return NotifyOutcome.failed
    if job is None:
        log.info("job %s: webhook not sent: the job was deleted", job_id)
        return NotifyOutcome.dropped
    url = notify_url_of(job)
    if url is None or not job.finished:
        # Only a finished job that asked for a webhook is announced; anything else is a stray message.
        log.warning("job %s: webhook not sent: the job is %s, notify URL %s", job_id, job.status.value, "set" if url else "unset")
        return NotifyOutcome.dropped
    try:
        secret = secret_for(settings, job.tenant)
    except WebhookConfigError as exc:  # the file may be mid-rotation: try again later
        log.warning("job %s: webhook attempt %d: %s", job_id, attempt, exc)
        return NotifyOutcome.failed
    if secret is None:
        log.error("job %s: webhook not sent: tenant %r has no webhook secret any more", job_id, job.tenant)
        return NotifyOutcome.dropped
    result = deliver(
        url,
        payload_for(job),
        secret=secret,
        delivery_id=delivery_id_for(job),
        # Parsed here, not cached: the allowlist of the worker's settings now, not at submission.
        allowlist=parse_allowlist(settings.webhook_allowed_hosts),
        timeout=settings.webhook_timeout_seconds,
    )
    if result.delivered:
        log.info("job %s: webhook attempt %d %s", job_id, attempt, result.describe())
        return NotifyOutcome.delivered
    if result.refused:
        # Off the allowlist now: the host was never contacted, and retrying cannot change that.
        log.error("job %s: webhook not sent: %s", job_id, result.error)
        return NotifyOutcome.dropped
    log.warning("job %s: webhook attempt %d failed: %s", job_id, attempt, result.describe())
    return NotifyOutcome.failed


def retry_delay(job_id: str, outcome: NotifyOutcome, attempt: int, settings: Settings) -> float | None:
    """Seconds until the next attempt, or None when there is none (logging the give-up)."""
    if outcome is not NotifyOutcome.failed:
        return None
    if attempt >= settings.webhook_max_attempts:
        log.error("job %s: webhook undelivered after %d attempt(s); giving up", job_id, attempt)
        return None
    return backoff_seconds(attempt, settings.webhook_backoff_seconds)
