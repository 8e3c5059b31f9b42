"""The worker-side reaper: re-queues jobs whose lease expired (their worker died).

Every worker runs one, in a daemon thread, every ``lease_seconds / 3`` seconds.
``store.requeue_expired`` is atomic, so with many workers each expired job is
returned to exactly one of them, which re-enqueues it (or, for a job out of
attempts that it failed with ``worker_lost``, announces its end: the webhook). Recovery after a
SIGKILLed worker is therefore bounded by the lease (plus one period), not by
the broker's visibility timeout (hours, above the hard time limit) — and with
the filesystem broker, which forgets unacked messages when the process dies,
it is the only recovery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from compactor.jobs import Job, utcnow
from compactor.store.base import JobStore

log = logging.getLogger(__name__)

Enqueue = Callable[[str, int], object]
OnEnded = Callable[[Job], object]


class Reaper:
    def __init__(self, store: JobStore, enqueue: Enqueue, *, interval: float, on_ended: OnEnded | None = None) -> None:
        self._store = store
        self._enqueue = enqueue
        # A job this reaper ended (worker_lost, or cancelled while its worker was gone) is
        # announced like one a worker ended (the job-end webhook).
        self._on_ended = on_ended
        self.interval = max(0.2, interval)
        self._stopping = threading.Event()
        # Jobs requeued in the store whose message could not be sent yet (broker down):
        # they are queued with no message, so keep trying until the send works.
        self._unsent: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="compactor-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def reap_once(self) -> list[str]:
        """One pass; returns the ids of the jobs re-enqueued."""
        try:
            for job in self._store.requeue_expired(utcnow()):
                if job.finished:
                    log.warning("job %s: lease expired after attempt %d; %s", job.id, job.attempts, job.status.value)
                    self._announce(job)
                    continue
                log.warning("job %s: lease expired after attempt %d; re-queued", job.id, job.attempts)
                self._unsent[job.id] = job.attempts + 1
        except Exception as exc:  # noqa: BLE001 - a store outage is retried next period
            log.warning("reaper: requeue_expired failed: %s", exc)
        sent: list[str] = []
        for job_id, attempt in list(self._unsent.items()):
            try:
                self._enqueue(job_id, attempt)
            except Exception as exc:  # noqa: BLE001 - retried next period
                log.warning("reaper: cannot enqueue job %s yet: %s", job_id, exc)
                continue
            del self._unsent[job_id]
            sent.append(job_id)
        return sent

    def _announce(self, job: Job) -> None:
        if self._on_ended is None:
            return
        try:
            self._on_ended(job)
        except Exception as exc:  # noqa: BLE001 - the job's outcome is recorded; only the announcement is lost
            log.error("job %s: its end could not be announced: %s", job.id, exc)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.reap_once()
