"""A real Celery worker subprocess on the filesystem broker, a real SQLite store, the real core."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compactor.jobs import JobStatus, Stage
from compactor.queue import CeleryJobQueue
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from tests.support.jobs import (
    QUICK_SPEC,
    TENANT,
    Proc,
    create_job,
    finetune_spec,
    sha256_of,
    start_worker,
    wait_for,
    wait_status,
    write_digits_dataset,
    write_torchscript_model,
)

# Short so the reaper test waits seconds, not the production 30 s.
LEASE_SECONDS = 3.0


@dataclass
class Env:
    data_dir: Path
    settings: Settings
    store: JobStore
    storage: LocalStorage
    queue: CeleryJobQueue
    worker: Proc
    model: Path
    dataset: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("worker")
    data_dir = root / "data"
    settings = Settings(data_dir=data_dir, lease_seconds=LEASE_SECONDS, heartbeat_seconds=0.5)
    store = open_store(settings.effective_store_url)
    storage = LocalStorage(settings.resolved_data_dir)
    queue = CeleryJobQueue(settings)
    model = write_torchscript_model(root / "tiny.ts")
    dataset = write_digits_dataset(root / "digits.pt")
    worker = start_worker(
        data_dir,
        root / "worker.log",
        COMPACTOR_LEASE_SECONDS=str(LEASE_SECONDS),
        COMPACTOR_HEARTBEAT_SECONDS="0.5",
    )
    try:
        yield Env(data_dir, settings, store, storage, queue, worker, model, dataset)
    finally:
        code = worker.terminate()
        queue.close()
        store.close()
        assert code == 0, worker.log()[-4000:]


def test_job_runs_to_success_once_despite_a_duplicate_delivery(env: Env) -> None:
    job = create_job(env.store, env.storage, env.model, QUICK_SPEC, env.dataset)
    # The same message twice (acks_late redelivery, a re-enqueue at start-up): one run only.
    env.queue.enqueue(job.id, 1)
    env.queue.enqueue(job.id, 1)

    seen: list[float] = []

    def finished() -> bool:
        current = env.store.get_job(job.id)
        assert current is not None
        seen.append(current.progress)
        return current.finished

    wait_for(finished, 90, f"job {job.id} to finish", interval=0.05)
    done = env.store.get_job(job.id)
    assert done is not None
    assert done.status is JobStatus.succeeded, done.error
    assert done.attempts == 1
    assert done.progress == 1.0
    assert seen == sorted(seen), "progress went backwards"
    assert done.metrics and "original" in done.metrics and "compressed" in done.metrics

    names = {artifact.name for artifact in done.artifacts}
    assert {"model.ts", "report.json"} <= names
    for artifact in done.artifacts:
        path = env.storage.artifact_path(job.id, artifact.name)
        assert path.stat().st_size == artifact.size_bytes
        assert sha256_of(path) == artifact.sha256
    assert not list(env.storage.job_dir(job.id).glob(".attempt-*")), "the attempt's temp dir was left behind"

    # The duplicate was delivered and refused by the claim.
    env.worker.wait_log(f"job {job.id} not claimed (succeeded", timeout=15)
    assert len(re.findall(rf"job {job.id}: attempt \d+ claimed", env.worker.log())) == 1


def test_delivery_while_another_attempt_holds_the_lease_does_nothing(env: Env) -> None:
    job = create_job(env.store, env.storage, env.model, QUICK_SPEC)
    # A live attempt elsewhere (another worker) owns the job.
    assert env.store.claim(job.id, "elsewhere", 120.0) is not None
    env.queue.enqueue(job.id, 2)

    env.worker.wait_log(f"job {job.id} not claimed (running, lease owner elsewhere)", timeout=15)
    current = env.store.get_job(job.id)
    assert current is not None
    assert current.status is JobStatus.running
    assert current.lease_owner == "elsewhere"
    assert current.attempts == 1
    assert current.progress == 0.0
    assert env.store.finish(job.id, "elsewhere", JobStatus.cancelled) is not None


def test_cancel_stops_a_running_job_and_the_worker_takes_the_next(env: Env) -> None:
    long_job = create_job(env.store, env.storage, env.model, finetune_spec(epochs=500), env.dataset)
    next_job = create_job(env.store, env.storage, env.model, QUICK_SPEC)
    env.queue.enqueue(long_job.id, 1)
    env.queue.enqueue(next_job.id, 1)

    def training() -> bool:
        current = env.store.get_job(long_job.id)
        assert current is not None and not current.finished, current
        return current.stage is Stage.finetune and current.progress > 0

    wait_for(training, 60, "the long job to be fine-tuning")
    env.store.request_cancel(long_job.id, TENANT)

    cancelled = wait_status(env.store, long_job.id, {JobStatus.cancelled, JobStatus.failed, JobStatus.succeeded}, 20)
    assert cancelled.status is JobStatus.cancelled, cancelled.error
    assert cancelled.artifacts == []
    assert not any(env.storage.job_dir(long_job.id).iterdir()), "a cancelled job must leave no files"

    after = wait_status(env.store, next_job.id, {JobStatus.succeeded, JobStatus.failed}, 60)
    assert after.status is JobStatus.succeeded, after.error


def test_reaper_requeues_a_job_whose_worker_died(env: Env) -> None:
    job = create_job(env.store, env.storage, env.model, QUICK_SPEC)
    # An attempt whose worker was SIGKILLed: it claimed, then never renewed its lease.
    assert env.store.claim(job.id, "dead-worker", 1.0) is not None
    # No message is sent: only the reaper can bring this job back.
    done = wait_status(env.store, job.id, {JobStatus.succeeded, JobStatus.failed}, 60)
    assert done.status is JobStatus.succeeded, done.error
    assert done.attempts == 2
    assert f"job {job.id}: lease expired after attempt 1; re-queued" in env.worker.log()
