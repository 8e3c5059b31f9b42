"""``execute_job`` in this process with a real SQLite store, real storage and the real core.

These cover the outcomes a worker process makes hard to provoke on cue: the soft
time limit, input the core refuses, a lease taken over mid-run, and a worker
shutdown that hands the job back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from compactor.jobs import JobStatus, utcnow
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from tests.support.jobs import (
    QUICK_SPEC,
    create_job,
    finetune_spec,
    wait_for,
    write_digits_dataset,
    write_torchscript_model,
)
from worker.runner import Outcome, execute_job


@pytest.fixture()
def parts(tmp_path: Path) -> Iterator[tuple[Settings, JobStore, LocalStorage]]:
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=3.0, heartbeat_seconds=0.2)
    store = open_store(settings.effective_store_url)
    yield settings, store, LocalStorage(settings.resolved_data_dir)
    store.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runner-inputs")
    return write_torchscript_model(root / "tiny.ts"), write_digits_dataset(root / "digits.pt")


def test_soft_time_limit_fails_with_timeout_and_keeps_no_artifacts(parts, inputs) -> None:
    settings, store, storage = parts
    settings = settings.model_copy(update={"job_soft_time_limit": 1.5})
    job = create_job(store, storage, inputs[0], finetune_spec(epochs=500), inputs[1])

    assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished

    done = store.get_job(job.id)
    assert done is not None and done.status is JobStatus.failed
    assert done.error is not None and done.error.code == "timeout"
    assert done.artifacts == [] and done.metrics is None
    assert not any(storage.job_dir(job.id).iterdir())


def test_input_the_core_refuses_fails_with_its_code(parts, tmp_path: Path) -> None:
    settings, store, storage = parts
    garbage = tmp_path / "not-a-model.bin"
    garbage.write_bytes(b"\x00\x01 definitely not a model " * 100)
    job = create_job(store, storage, garbage, QUICK_SPEC)

    assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished

    done = store.get_job(job.id)
    assert done is not None and done.status is JobStatus.failed
    assert done.error is not None
    assert done.error.code not in {"internal_error", "timeout"}, done.error
    assert "Traceback" not in done.error.message


def test_a_claimed_job_is_not_claimed_again(parts, inputs) -> None:
    settings, store, storage = parts
    job = create_job(store, storage, inputs[0], QUICK_SPEC)
    assert store.claim(job.id, "first", 60.0) is not None

    assert execute_job(job.id, store, storage, settings, "second") is Outcome.skipped
    current = store.get_job(job.id)
    assert current is not None and current.lease_owner == "first" and current.attempts == 1


def test_an_attempt_that_lost_its_lease_writes_nothing(parts, inputs) -> None:
    settings, store, storage = parts
    job = create_job(store, storage, inputs[0], finetune_spec(epochs=500), inputs[1])
    outcome: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcome.append(execute_job(job.id, store, storage, settings, "paused")))
    thread.start()
    wait_for(lambda: (store.get_job(job.id) or job).progress > 0, 60, "the attempt to make progress")

    # Another worker's reaper decided this attempt is dead (as after a long GC pause or a
    # network partition) and re-queued the job.
    requeued = store.requeue_expired(utcnow() + timedelta(seconds=settings.lease_seconds + 1))
    assert [j.id for j in requeued] == [job.id]
    thread.join(30)

    assert outcome == [Outcome.lost]
    current = store.get_job(job.id)
    assert current is not None and current.status is JobStatus.queued and current.lease_owner is None
    assert current.artifacts == [] and current.error is None


def test_shutdown_hands_the_job_back_for_an_immediate_takeover(parts, inputs) -> None:
    settings, store, storage = parts
    job = create_job(store, storage, inputs[0], finetune_spec(epochs=500), inputs[1])
    stopping = threading.Event()
    outcome: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: outcome.append(execute_job(job.id, store, storage, settings, "leaving", shutdown_requested=stopping.is_set))
    )
    thread.start()
    wait_for(lambda: (store.get_job(job.id) or job).progress > 0, 60, "the attempt to make progress")
    stopping.set()
    thread.join(30)

    assert outcome == [Outcome.interrupted]
    # Handed back, not left to run out: queued at once, and the stop did not use up an attempt.
    handed_back = store.get_job(job.id)
    assert handed_back is not None and handed_back.status is JobStatus.queued and handed_back.attempts == 0
    taken = store.claim(job.id, "next", 60.0)
    assert taken is not None and taken.attempts == 1
