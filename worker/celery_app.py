"""The worker's Celery app: ``celery -A worker.celery_app worker --pool solo``.

Built from ``compactor.queue.celery_config`` — the same function the gateway's
client app uses — so producer and consumer always agree on broker, folders,
queue, acks and limits. Importing this module loads no torch: the parent of a
prefork pool must never touch CUDA before it forks.

Worker lifecycle hooks (Celery signals):
- ``worker_process_init``: import torch and the core in the process that runs jobs.
- ``worker_ready``: start the reaper thread (re-queues jobs whose lease expired).
- ``worker_shutting_down``: a warm shutdown began (SIGTERM / first Ctrl-C); the
  running attempt sees it at its next batch, hands its job back and returns, so a
  stop never waits for a multi-hour job.
- ``worker_shutdown``: stop the reaper.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from celery import Celery, signals

from compactor.logs import configure_logging
from compactor.queue import celery_config
from compactor.settings import get_settings
from worker.runtime import WORKER_DEVICE_ENV

log = logging.getLogger(__name__)

app = Celery("compactor-worker", include=["worker.tasks"])
# acks_late, reject_on_worker_lost, prefetch 1 and the time limits all come from here.
app.conf.update(celery_config(get_settings()))

# Set from the signal handler: the running attempt polls it between batches.
shutdown_event = threading.Event()

_reaper: Any = None


@signals.worker_init.connect
def _configure_logging(**_: Any) -> None:
    # worker_hijack_root_logger is off (the config is shared with the gateway), so the
    # project's own loggers would print nothing; give them a plain handler.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    device = os.environ.get(WORKER_DEVICE_ENV, "auto")
    # "torch loaded: False" is the proof that this process (a prefork parent included) has not
    # touched CUDA before its device was chosen; worker_process_init loads it afterwards.
    log.info(
        "compactor worker pid %d, device %s, CUDA_VISIBLE_DEVICES=%s, torch loaded: %s",
        os.getpid(),
        device,
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        "torch" in sys.modules,
    )


@signals.worker_process_init.connect
def _preload_core(**_: Any) -> None:
    # Sent in the process that runs tasks (the solo worker itself, or each prefork child after
    # the fork), never in a prefork parent: load torch and the core now so that the first job
    # does not pay for it and a broken install shows at start-up, not as a failed job.
    if _is_notifier():
        return
    started = time.perf_counter()
    from worker.sandbox import confinement_status, start_fork_server

    start_fork_server()  # imports torch in its own process while this one loads the core
    # Whether this kernel can confine uploaded TorchScript, logged now rather than at the first
    # such job (which would wait for it): a self-test child, once the fork server is up.
    threading.Thread(target=confinement_status, args=(get_settings().resolved_data_dir,), name="confinement-self-test", daemon=True).start()
    import worker.compression.pipeline  # noqa: F401

    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)

    log.info("compression core loaded in %.1fs", time.perf_counter() - started)


def _is_notifier() -> bool:
    # `compactor notifier` (launcher/cli.py) consumes webhooks only: no torch, no reaper.
    return os.environ.get("COMPACTOR_WORKER_ROLE") == "notifier"


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper
    if _is_notifier():
        return
    from compactor.store import open_store
    from compactor.webhooks import notify_url_of
    from worker.reaper import Reaper
    from worker.runtime import open_queue

    settings = get_settings()
    # Its own store and producer: the reaper thread runs beside the task thread.
    queue = open_queue(settings)
    _reaper = Reaper(
        open_store(settings.effective_store_url),
        lambda job_id, attempt: queue.enqueue(job_id, attempt),
        interval=settings.lease_seconds / 3,
        # Jobs the reaper ends (worker_lost) get their webhook like jobs a worker ends.
        on_ended=lambda job: notify_url_of(job) is not None and queue.enqueue_notification(job.id),
    )
    _reaper.start()
    log.info("reaper started (every %.1fs)", _reaper.interval)


@signals.worker_shutting_down.connect
def _note_shutdown(**_: Any) -> None:
    shutdown_event.set()


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
