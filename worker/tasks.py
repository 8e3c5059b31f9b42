"""The Celery tasks: ``compactor.run_job(job_id)`` and ``compactor.notify_job(job_id)``. No logic lives here.

``run_job`` receives only an id, re-reads everything from the store (``execute_job``
claims first, which is what makes any redelivery or retry safe), and acts on
the outcome. A worker that is stopping gives the message back to the broker
(``Reject(requeue=True)``) instead of acknowledging it: both for an attempt it
interrupted (the store already shows it queued, so another worker — or this one
after a restart — resumes at once) and for a message Celery still hands it
during its last loop cycle after the stop signal, which must not start a run.

A job that an attempt ended (succeeded, failed, cancelled) is announced right after its
outcome is recorded: ``compactor.notify_job`` POSTs the signed webhook when its spec asked
for one, retrying with backoff through Celery (worker/notify.py).
"""

from __future__ import annotations

import logging
import os
import secrets
from functools import partial

from celery import Task
from celery.exceptions import Reject

from compactor.queue import NOTIFY_TASK_NAME, TASK_NAME
from compactor.store.base import StoreUnavailable
from worker.celery_app import app, shutdown_event
from worker.notify import announce_job_end, deliver_job_end, retry_delay
from worker.runner import Outcome, execute_job
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

# Exit status of a worker that killed itself because a job ignored its hard time limit;
# the supervisor (compactor serve, or the container's restart policy) starts a fresh one.
EXIT_HARD_TIMEOUT = 70


def _exit_after_hard_timeout(job_id: str) -> None:
    # The core is stuck in code that never checks for cancellation; a thread cannot be
    # stopped from outside, so the process goes. The job was already recorded as failed:
    # its webhook message is sent first (a synchronous publish), or it would never be.
    runtime = get_runtime()
    announce_job_end(app, runtime.settings, runtime.store, job_id)
    log.critical("exiting the worker process: a job ignored its hard time limit")
    logging.shutdown()
    os._exit(EXIT_HARD_TIMEOUT)


@app.task(
    name=TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # A store outage before the claim: try again later (the claim makes it idempotent).
    autoretry_for=(StoreUnavailable,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=10,
)
def run_job(self: Task, job_id: str) -> str:
    if shutdown_event.is_set():
        # Claiming now would start an attempt only to hand it back: leave the job for the next worker.
        raise Reject(f"worker stopping; job {job_id} goes back to the queue", requeue=True)
    runtime = get_runtime()
    # Unique per attempt: a redelivery of the same task id must not pass for the live attempt.
    owner = f"{self.request.hostname}/{os.getpid()}/{self.request.id}/{secrets.token_hex(4)}"
    outcome = execute_job(
        job_id,
        runtime.store,
        runtime.storage,
        runtime.settings,
        owner,
        shutdown_requested=shutdown_event.is_set,
        on_hard_timeout=partial(_exit_after_hard_timeout, job_id),
    )
    if outcome is Outcome.interrupted:
        # The store already shows the job queued (attempt not counted) and this attempt has
        # stopped, so whichever worker gets the message back claims it as the only live attempt;
        # a second message for it (a re-enqueue at start-up, the reaper's) finds it claimed and
        # does nothing. Should the requeue itself be lost (the process killed right now), the
        # job's redelivery deadline lets any worker's reaper send it again within a lease, and
        # `compactor serve` re-enqueues unfinished jobs when it starts.
        raise Reject(f"worker stopping; job {job_id} handed back", requeue=True)
    if outcome is Outcome.finished:
        # After the outcome is recorded, so a webhook can never delay or change it.
        announce_job_end(app, runtime.settings, runtime.store, job_id)
    return outcome.value


@app.task(name=NOTIFY_TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def notify_job(self: Task, job_id: str) -> str:
    runtime = get_runtime()
    attempt = self.request.retries + 1
    outcome = deliver_job_end(job_id, runtime.store, runtime.settings, attempt)
    delay = retry_delay(job_id, outcome, attempt, runtime.settings)
    if delay is not None:
        # Same task id and arguments; Celery counts the retries (request.retries).
        raise self.retry(countdown=delay, max_retries=runtime.settings.webhook_max_attempts - 1)
    return outcome.value
