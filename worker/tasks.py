"""The one Celery task: ``compactor.run_job(job_id)``. No logic lives here.

It receives only an id, re-reads everything from the store (``execute_job``
claims first, which is what makes any redelivery or retry safe), and acts on
the outcome. A worker that is stopping gives the message back to the broker
(``Reject(requeue=True)``) instead of acknowledging it: both for an attempt it
interrupted (the lease is already released, so another worker — or this one
after a restart — resumes at once) and for a message Celery still hands it
during its last loop cycle after the stop signal, which must not start a run.
"""

from __future__ import annotations

import logging
import os
import secrets

from celery import Task
from celery.exceptions import Reject

from compactor.queue import TASK_NAME
from compactor.store.base import StoreUnavailable
from worker.celery_app import app, shutdown_event
from worker.runner import Outcome, execute_job
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

# Exit status of a worker that killed itself because a job ignored its hard time limit;
# the supervisor (compactor serve, or the container's restart policy) starts a fresh one.
EXIT_HARD_TIMEOUT = 70


def _exit_after_hard_timeout() -> None:
    # The core is stuck in code that never checks for cancellation; a thread cannot be
    # stopped from outside, so the process goes. The job was already recorded as failed.
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
        on_hard_timeout=_exit_after_hard_timeout,
    )
    if outcome is Outcome.interrupted:
        # Should the requeue itself be lost (the process killed right now), the released
        # lease lets any worker's reaper re-queue the job within lease/3 seconds, and
        # `compactor serve` re-enqueues unfinished jobs when it starts.
        raise Reject(f"worker stopping; job {job_id} handed back", requeue=True)
    return outcome.value
