"""A small real deployment for the fault scenarios: worker processes, a gateway, Redis.

Workers are ``python -m launcher.cli worker`` (solo pool) and the gateway is
``python -m launcher.cli gateway``, sharing one data directory and one Redis (broker on
one database, job store on another). The test is the operator: it kills processes,
restarts them the way a supervisor would, and reads what happened from the store and the
workers' logs (``tests/faults/ledger.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from compactor.jobs import Job, new_id
from compactor.queue import CeleryJobQueue
from compactor.settings import Settings
from compactor.spec import parse_spec
from compactor.storage import LocalStorage
from compactor.store import open_store
from tests.faults.ledger import Ledger
from tests.support.jobs import TENANT, Proc, add_upload, child_env, free_port, wait_answering, wait_for

# Short leases so that recovery takes seconds (production: 30 s lease, 1 s heartbeat).
LEASE_SECONDS = 3.0
HEARTBEAT_SECONDS = 0.5
WORKER_READY_SECONDS = 90.0  # two workers importing torch at once on two busy cores


@dataclass
class WorkerProcess:
    name: str
    proc: Proc
    died_at: datetime | None = None  # when the harness killed it or saw it gone
    killed_by: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.process.poll() is None


@dataclass
class Cluster:
    root: Path
    broker_url: str
    store_url: str
    # Extra COMPACTOR_* (or other) variables for the workers, e.g. time limits.
    worker_env: Mapping[str, str] = field(default_factory=dict)
    # What runs a worker: the CLI, or a test launcher that wraps it (see visibility_worker.py).
    worker_module: str = "launcher.cli"
    lease_seconds: float = LEASE_SECONDS
    # CPU priority of the workers (nice), for hosts where they share cores with the gateway.
    worker_niceness: int = 0

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            data_dir=self.data_dir,
            broker_url=self.broker_url,
            store_url=self.store_url,
            lease_seconds=self.lease_seconds,
            heartbeat_seconds=HEARTBEAT_SECONDS,
        )
        self.store = open_store(self.store_url)
        self.storage = LocalStorage(self.settings.resolved_data_dir)
        self.queue = CeleryJobQueue(self.settings)
        self.workers: list[WorkerProcess] = []
        self.gateway: Proc | None = None
        self.gateway_port = free_port()
        self._lock = threading.Lock()
        self._generation = 0
        self._stop_watching = threading.Event()
        self._watchers: list[threading.Thread] = []
        self._closed = False

    # -- environment

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(
            self.data_dir,
            COMPACTOR_BROKER_URL=self.broker_url,
            COMPACTOR_STORE_URL=self.store_url,
            COMPACTOR_LEASE_SECONDS=str(self.lease_seconds),
            COMPACTOR_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
            # One core each: two workers and a gateway share two cores.
            COMPACTOR_TORCH_THREADS="1",
            # The children stop when the test process dies (bind_to_parent), so an interrupted
            # run leaves no worker behind. (Linux ties this to the spawning thread, which is
            # the test's main thread or the supervising thread, both alive until close().)
            COMPACTOR_SUPERVISOR_PID=str(os.getpid()),
            **extra,
        )

    # -- workers

    def spawn_worker(self) -> WorkerProcess:
        """Start one worker process (not waiting for it: see ``start_workers``, ``wait_workers_ready``)."""
        with self._lock:
            self._generation += 1
            name = f"w{self._generation}"
        argv = [sys.executable, "-m", self.worker_module, "worker", "--name", f"{name}@%h"]
        if self.worker_niceness:
            argv = ["nice", "-n", str(self.worker_niceness), *argv]  # nice execs: the pid stays the worker's
        proc = Proc(argv, self.env(**self.worker_env), self.logs / f"{name}.log")
        worker = WorkerProcess(name, proc)
        with self._lock:
            self.workers.append(worker)
        return worker

    def start_workers(self, count: int) -> list[WorkerProcess]:
        started = [self.spawn_worker() for _ in range(count)]  # all import torch at once
        for worker in started:
            worker.proc.wait_log(" ready.", timeout=WORKER_READY_SECONDS)
        return started

    def live_workers(self) -> list[WorkerProcess]:
        with self._lock:
            return [worker for worker in self.workers if worker.alive()]

    def kill(self, worker: WorkerProcess, reason: str) -> datetime:
        """SIGKILL, as the OOM killer or a power cut would; returns the moment of the kill."""
        with self._lock:
            moment = datetime.now()
            if worker.died_at is None:
                worker.died_at, worker.killed_by = moment, reason
            os.kill(worker.pid, signal.SIGKILL)
        worker.proc.process.wait()
        return moment

    def worker_running(self, job: Job) -> WorkerProcess:
        """The live worker process that holds ``job``'s lease (the owner names its pid)."""
        assert job.lease_owner is not None, f"job {job.id} has no lease owner"
        pid = int(job.lease_owner.split("/")[1])
        (worker,) = [worker for worker in self.live_workers() if worker.pid == pid]
        return worker

    def keep_workers(self, count: int) -> None:
        """Supervise ``count`` worker slots: a worker that dies is replaced, as ``compactor
        serve``'s supervisor or a container restart policy would."""

        def supervise() -> None:
            while not self._stop_watching.wait(0.1):
                with self._lock:
                    gone = [worker for worker in self.workers if not worker.alive() and worker.died_at is None]
                    for worker in gone:
                        worker.died_at = datetime.now()
                        worker.killed_by = worker.killed_by or f"exited {worker.proc.process.returncode}"
                        worker.proc.close()
                    alive = sum(1 for worker in self.workers if worker.alive())
                for _ in range(count - alive):
                    self.spawn_worker()

        self._watch(supervise)

    @contextmanager
    def memory_limit(self, limit_bytes: int) -> Iterator[list[tuple[datetime, int]]]:
        """While inside: when a worker's process tree (the worker, its fork server and the job's
        child) holds more than ``limit_bytes`` (Pss), SIGKILL the process the OOM killer would pick — what the
        kernel's OOM killer does to a container over its memory limit (``docker run --memory``, a
        Kubernetes pod's ``limits.memory``). Emulated because a test cannot portably create a
        cgroup; the kill is the same signal a real limit sends. Yields the kills (moment, pid)."""
        lifted = threading.Event()
        kills: list[tuple[datetime, int]] = []

        def enforce() -> None:
            while not lifted.wait(0.02) and not self._stop_watching.is_set():
                for worker in self.live_workers():
                    tree = process_tree(worker.pid)
                    # A cgroup charges each page once: proportional shares, not each process's RSS.
                    if sum(proportional_bytes(pid) for pid in tree) > limit_bytes:
                        # The kernel's choice: the highest badness (RSS, page tables, oom_score_adj).
                        largest = max(tree, key=oom_score)
                        if largest == worker.pid:
                            kills.append((self.kill(worker, f"memory limit {limit_bytes // 2**20} MiB"), largest))
                        else:
                            try:
                                os.kill(largest, signal.SIGKILL)
                                kills.append((datetime.now(), largest))
                            except ProcessLookupError:
                                pass

        thread = threading.Thread(target=enforce, daemon=True)
        thread.start()
        try:
            yield kills
        finally:
            lifted.set()
            thread.join(5)

    def wait_workers_ready(self, count: int, timeout: float = WORKER_READY_SECONDS) -> list[WorkerProcess]:
        """Wait until ``count`` live workers have logged that they are ready (after restarts)."""

        def ready() -> list[WorkerProcess]:
            live = [worker for worker in self.live_workers() if " ready." in worker.proc.log()]
            return live if len(live) >= count else []

        return wait_for(ready, timeout, f"{count} ready workers", interval=0.2)

    def _watch(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._watchers.append(thread)

    # -- jobs

    def submit(self, model: Path, spec: Mapping[str, Any], dataset: Path | None = None, *, max_attempts: int = 3) -> Job:
        """A job as the gateway makes it (uploads stored, spec validated), then its message."""
        job = self.store.create_job(
            Job(
                id=new_id("job"),
                tenant=TENANT,
                model_id=add_upload(self.store, self.storage, model, "model", "torchscript"),
                dataset_id=add_upload(self.store, self.storage, dataset, "dataset", "pt") if dataset else None,
                spec=parse_spec(dict(spec)).model_dump(mode="json"),
                max_attempts=max_attempts,
            )
        )
        self.queue.enqueue(job.id)
        return job

    def jobs(self, job_ids: Iterable[str]) -> dict[str, Job | None]:
        return {job_id: self.store.get_job(job_id) for job_id in job_ids}

    def wait_finished(self, job_ids: Iterable[str], timeout: float) -> dict[str, Job | None]:
        """Wait until every job is terminal (or gone); returns what the store says at the end,
        unfinished ones included (those count as lost)."""
        wanted = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(wanted)
            if all(job is None or job.finished for job in jobs.values()) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.2)

    def ledger(self) -> Ledger:
        with self._lock:
            logs = [(worker.proc.log_path, worker.died_at) for worker in self.workers]
        return Ledger.read(logs)

    # -- gateway

    def start_gateway(self) -> Proc:
        argv = [sys.executable, "-m", "launcher.cli", "gateway", "--port", str(self.gateway_port)]
        self.gateway = Proc(argv, self.env(), self.logs / f"gateway-{new_id('g')}.log")
        wait_answering(self.gateway, self.base_url, interval=0.05)
        return self.gateway

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    # -- teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_watching.set()
        for thread in self._watchers:
            thread.join(5)
        # Every job is over by now, so nothing is handed back: stop fast, but not with SIGKILL,
        # so that a worker that fails to stop shows up as a timeout here.
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            if worker.alive():
                worker.proc.process.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.proc.process.wait(timeout=20)
            except Exception:  # noqa: BLE001 - teardown must not leave processes behind
                worker.proc.process.kill()
                worker.proc.process.wait()
            worker.proc.close()
        if self.gateway is not None:
            self.gateway.kill()
        self.queue.close()
        self.store.close()


ClusterFactory = Callable[..., Cluster]


def flush_databases(urls: Iterable[str]) -> None:
    """Empty the Redis databases a cluster is about to use (or has used)."""
    for url in urls:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    from tests.support.jobs import children_of

    tree, frontier = [pid], [pid]
    while frontier:
        children = children_of(frontier.pop())
        tree += children
        frontier += children
    return tree


def tree_resident_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, each shared page counted once (Pss)."""
    return sum(proportional_bytes(member) for member in process_tree(pid))


def proportional_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def oom_score(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/oom_score").read_text())
    except (OSError, ValueError):
        return -1
