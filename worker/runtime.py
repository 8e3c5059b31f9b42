"""Per-process worker resources: settings, job store, artifact storage, queue.

Opened lazily on first use and re-opened after a fork (prefork pool children),
because a store connection must never cross a fork. No torch here.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compactor.settings import Settings, get_settings
from compactor.store import open_store
from compactor.store.base import JobStore

if TYPE_CHECKING:
    from compactor.queue import CeleryJobQueue
    from compactor.storage import LocalStorage

# Set by ``compactor worker --gpu N`` (with CUDA_VISIBLE_DEVICES) so logs say which device this
# process owns; the core's device "auto" then picks that one visible GPU.
WORKER_DEVICE_ENV = "COMPACTOR_WORKER_DEVICE"


@dataclass
class WorkerRuntime:
    settings: Settings
    store: JobStore
    storage: LocalStorage
    pid: int


_lock = threading.Lock()
_runtime: WorkerRuntime | None = None


def open_storage(settings: Settings) -> LocalStorage:
    from compactor.storage import LocalStorage

    return LocalStorage(settings.resolved_data_dir)


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            settings = get_settings()
            _runtime = WorkerRuntime(
                settings=settings,
                store=open_store(settings.effective_store_url),
                storage=open_storage(settings),
                pid=os.getpid(),
            )
        return _runtime


def open_queue(settings: Settings) -> CeleryJobQueue:
    from compactor.queue import CeleryJobQueue

    return CeleryJobQueue(settings)
