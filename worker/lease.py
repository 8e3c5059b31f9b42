"""One attempt's lease on a job: renewed by a heartbeat thread that also records progress.

While the core works, a daemon thread calls ``store.heartbeat`` every
``interval`` seconds. Each call renews the lease, writes the latest stage and
progress the core reported, and returns the job, whose ``cancel_requested``
flag tells the attempt to stop. When ``heartbeat`` returns None another
attempt owns the job (our lease expired and was taken over): this attempt must
stop and write nothing more.

Between ``start()`` and ``stop()`` only the heartbeat thread talks to the
store; the thread that runs the core only reads this object's flags. That
keeps store access single-threaded per attempt whatever the store's
connection model.

Stopping reasons are checked by ``should_cancel`` (the core calls it between
batches). A solo Celery pool enforces no time limits, so the soft and hard job
time limits are enforced here too: past the soft limit the core is asked to
stop; past the hard limit (the core ignored the request, e.g. stuck in one long
operation) the job is failed with ``timeout`` from this thread and
``on_hard_timeout`` is called, which in a worker ends the process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from compactor.jobs import Job, JobError, JobStatus, Stage
from compactor.store.base import JobStore

log = logging.getLogger(__name__)


class StopReason(StrEnum):
    cancel_requested = "cancel_requested"
    lease_lost = "lease_lost"
    timeout = "timeout"
    shutdown = "shutdown"


def _stage_of(name: str) -> Stage | None:
    # The core reports Stage members (the catalogue's); anything else is a bug, said, not stored.
    try:
        return Stage(name)
    except ValueError:
        log.warning("progress for an unknown stage %r ignored; stages are compactor.jobs.Stage members", name)
        return None


class LeaseKeeper:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        owner: str,
        *,
        lease_seconds: float,
        interval: float,
        soft_time_limit: float | None = None,
        hard_time_limit: float | None = None,
        shutdown_requested: Callable[[], bool] | None = None,
        on_hard_timeout: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.job_id = job_id
        self.owner = owner
        self._lease_seconds = lease_seconds
        # Never let the interval reach the lease: one late beat would lose the job.
        self._interval = max(0.05, min(interval, lease_seconds / 3))
        self._clock = clock
        started = clock()
        self._soft_deadline = started + soft_time_limit if soft_time_limit else math.inf
        self._hard_deadline = started + hard_time_limit if hard_time_limit else math.inf
        self._shutdown_requested = shutdown_requested or (lambda: False)
        self._on_hard_timeout = on_hard_timeout
        self._lock = threading.Lock()
        self._stage: Stage | None = None
        self._progress = 0.0
        self._reason: StopReason | None = None
        self._last_renewal = started
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    # -- called from the thread that runs the core

    def progress(self, stage: str, fraction: float) -> None:
        """The core's progress callback: remember the latest; the heartbeat writes it."""
        with self._lock:
            self._stage = _stage_of(stage) or self._stage
            if math.isfinite(fraction):
                # The store also refuses to go backwards; doing it here keeps each beat monotonic.
                self._progress = max(self._progress, min(max(fraction, 0.0), 1.0))

    def should_cancel(self) -> bool:
        """True once the attempt must stop; the core raises Cancelled at its next check."""
        return self.reason is not None

    @property
    def reason(self) -> StopReason | None:
        with self._lock:
            if self._reason is None:
                if self._clock() >= self._soft_deadline:
                    self._reason = StopReason.timeout
                elif self._shutdown_requested():
                    self._reason = StopReason.shutdown
            return self._reason

    @property
    def lost(self) -> bool:
        with self._lock:
            return self._reason is StopReason.lease_lost

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (the caller talks to the store itself from now on)."""
        self._stopping.set()
        self._thread.join()

    def renew_now(self) -> bool:
        """A synchronous renewal (after ``stop``): False when the lease is gone.

        A store that cannot answer is retried until the lease would have run out: a finished
        job's result is only recorded after this, and a store blip at that moment must not
        throw hours of work away (while the lease lives, no other attempt can own the job)."""
        delay = 0.1
        while not self._beat(self._lease_seconds):
            if self.lost:  # taken over, or unanswered for a whole lease: it may be someone else's now
                return False
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        return True

    def release(self) -> Job | None:
        """Hand the job back unfinished (after ``stop``; the worker is shutting down): it is
        queued again at once, for any worker's next claim, and this attempt does not count
        against ``max_attempts`` (``JobStore.release``). Returns the job as handed back (or
        cancelled, when a cancel was asked meanwhile); None when the lease was already lost or
        the store cannot answer, in which case the lease runs out and the reaper re-queues it."""
        try:
            job = self._store.release(self.job_id, self.owner)
        except Exception as exc:  # noqa: BLE001 - a stopping worker must still stop
            log.warning("job %s: handing it back failed (%s); its lease will expire instead", self.job_id, exc)
            return None
        if job is None:
            log.warning("job %s: lease lost (%s no longer owns it); nothing to hand back", self.job_id, self.owner)
            self._set_reason(StopReason.lease_lost)
        return job

    # -- the heartbeat thread

    def _set_reason(self, reason: StopReason) -> None:
        with self._lock:
            # Losing the lease overrides everything: whatever we meant to record, we may not.
            if self._reason is None or reason is StopReason.lease_lost:
                self._reason = reason

    def _beat(self, lease_seconds: float) -> bool:
        with self._lock:
            stage, progress = self._stage, self._progress
        try:
            job = self._store.heartbeat(self.job_id, self.owner, lease_seconds, stage=stage, progress=progress)
        except Exception as exc:  # noqa: BLE001 - a store outage must not kill the attempt at once
            log.warning("heartbeat for job %s failed: %s", self.job_id, exc)
            if self._clock() - self._last_renewal >= self._lease_seconds:
                # The lease has certainly expired by now; someone else may own the job.
                self._set_reason(StopReason.lease_lost)
            return False
        if job is None:
            log.warning("job %s: lease lost (%s no longer owns it); stopping this attempt", self.job_id, self.owner)
            self._set_reason(StopReason.lease_lost)
            return False
        self._last_renewal = self._clock()
        if job.cancel_requested:
            self._set_reason(StopReason.cancel_requested)
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            if self.lost:
                return
            self._beat(self._lease_seconds)
            if self._clock() >= self._hard_deadline:
                self._hard_timeout()
                return

    def _hard_timeout(self) -> None:
        log.error("job %s ran past its hard time limit and did not stop; failing it", self.job_id)
        self._set_reason(StopReason.timeout)
        try:
            self._store.finish(
                self.job_id,
                self.owner,
                JobStatus.failed,
                error=JobError(code="timeout", message="the job ran past its hard time limit and was stopped"),
            )
        except Exception:  # the lease then expires and the reaper decides
            log.exception("could not record the hard timeout of job %s", self.job_id)
        if self._on_hard_timeout is not None:
            self._on_hard_timeout()
