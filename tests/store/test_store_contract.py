"""One contract, two job stores: every test runs against SQLite (a file in tmp_path) and
Redis (database 13 on 127.0.0.1:6379, flushed around each test).

Redis tests are skipped when no server answers, and fail instead when
COMPACTOR_REQUIRE_REDIS=1 (CI sets it where Redis is part of the environment).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from compactor.jobs import Artifact, Job, JobError, JobStatus, Stage, Upload, new_id, utcnow
from compactor.store import InvalidCursor, JobStore, StoreUnavailable, open_store
from compactor.store.redis import RedisJobStore
from compactor.store.sqlite import SQLiteJobStore
from tests.support.jobs import redis_or_skip

# A database of its own, flushed by the fixture; overridable to point at another server.
REDIS_URL = os.environ.get("COMPACTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
TENANT = "acme"
OTHER_TENANT = "globex"


class SteppingClock:
    """The stores' clock, moved by the test, so lease expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _flushed_redis_or_skip() -> redis.Redis:
    client: redis.Redis = redis_or_skip(REDIS_URL)
    client.flushdb()
    return client


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        return
    client = _flushed_redis_or_skip()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture()
def clock() -> SteppingClock:
    return SteppingClock()


@pytest.fixture()
def store(store_url: str, clock: SteppingClock) -> Iterator[JobStore]:
    opened: JobStore
    if store_url.startswith("sqlite:///"):
        opened = SQLiteJobStore(store_url.removeprefix("sqlite:///"), clock=clock)
    else:
        opened = RedisJobStore(store_url, clock=clock)
    yield opened
    opened.close()


def make_job(tenant: str = TENANT, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": new_id("job"),
        "tenant": tenant,
        "model_id": "mdl_tiny",
        "spec": {"prune": {"amount": 0.5}, "device": "cpu"},
    }
    values.update(fields)
    return Job(**values)


def list_all(store: JobStore, tenant: str, *, status: JobStatus | None = None, limit: int) -> list[str]:
    """Every page of the listing, concatenated, checking the cursor chain ends."""
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        page, cursor = store.list_jobs(tenant, status=status, limit=limit, cursor=cursor)
        assert len(page) <= limit
        ids += [job.id for job in page]
        if cursor is None:
            return ids
    raise AssertionError("the cursor chain never ended")


# -- create, get, tenants


def test_create_and_get_round_trip_the_whole_job(store: JobStore) -> None:
    job = make_job(dataset_id="dat_digits", max_attempts=5)
    assert store.create_job(job) == job
    assert store.get_job(job.id, TENANT) == job
    assert store.get_job(job.id) == job  # the worker's unscoped read
    assert store.get_job(job.id, OTHER_TENANT) is None
    assert store.get_job("job_missing", TENANT) is None


def test_create_refuses_a_duplicate_id_or_a_job_that_is_not_queued(store: JobStore) -> None:
    job = store.create_job(make_job())
    with pytest.raises(ValueError):
        store.create_job(make_job(id=job.id))
    with pytest.raises(ValueError):
        store.create_job(make_job(status=JobStatus.running))


def test_another_tenant_cannot_see_cancel_or_delete_a_job(store: JobStore) -> None:
    job = store.create_job(make_job())
    assert store.request_cancel(job.id, OTHER_TENANT) is None
    assert store.delete_job(job.id, OTHER_TENANT) is False
    assert store.list_jobs(OTHER_TENANT) == ([], None)
    assert store.get_job(job.id, TENANT) == job


# -- listing


def test_list_is_newest_first_and_pages_without_duplicates_or_gaps(store: JobStore) -> None:
    base = utcnow()
    jobs = [make_job(created_at=base - timedelta(seconds=index)) for index in range(5)]
    # Three jobs created in the same microsecond: the id breaks the tie, on both stores alike.
    jobs += [make_job(created_at=base - timedelta(seconds=2)) for _ in range(3)]
    for job in jobs:
        store.create_job(job)
    store.create_job(make_job(tenant=OTHER_TENANT, created_at=base))

    expected = [job.id for job in sorted(jobs, key=lambda job: (job.created_at, job.id), reverse=True)]
    for limit in (1, 3, 8, 50):
        assert list_all(store, TENANT, limit=limit) == expected
    first_page, cursor = store.list_jobs(TENANT, limit=8)
    assert [job.id for job in first_page] == expected and cursor is None


def test_list_filters_by_status_and_follows_status_changes(store: JobStore) -> None:
    base = utcnow()
    jobs = [store.create_job(make_job(created_at=base - timedelta(seconds=index))) for index in range(6)]
    for job in jobs[::2]:
        store.request_cancel(job.id, TENANT)
    assert store.claim(jobs[1].id, "worker-a", 30) is not None

    assert list_all(store, TENANT, status=JobStatus.cancelled, limit=2) == [job.id for job in jobs[::2]]
    assert list_all(store, TENANT, status=JobStatus.queued, limit=1) == [jobs[3].id, jobs[5].id]
    assert list_all(store, TENANT, status=JobStatus.running, limit=5) == [jobs[1].id]
    assert list_all(store, TENANT, status=JobStatus.succeeded, limit=5) == []


def test_a_cursor_stays_valid_while_newer_jobs_arrive(store: JobStore) -> None:
    base = utcnow()
    jobs = [store.create_job(make_job(created_at=base - timedelta(seconds=index))) for index in range(4)]
    page, cursor = store.list_jobs(TENANT, limit=2)
    store.create_job(make_job(created_at=base + timedelta(seconds=1)))
    rest, end = store.list_jobs(TENANT, limit=2, cursor=cursor)
    assert [job.id for job in page + rest] == [job.id for job in jobs] and end is None


def test_list_refuses_a_forged_cursor_and_a_bad_limit(store: JobStore) -> None:
    for forged in ("not-a-cursor!", "WzEsMiwzXQ", "bnVsbA"):  # garbage, [1,2,3], null
        with pytest.raises(InvalidCursor):
            store.list_jobs(TENANT, cursor=forged)
    with pytest.raises(ValueError):
        store.list_jobs(TENANT, limit=0)


# -- idempotency


def test_an_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first = store.create_job(make_job(idempotency_key="retry-1"))
    again = store.create_job(make_job(idempotency_key="retry-1", spec={"different": True}))
    assert again == first
    other_tenant = store.create_job(make_job(tenant=OTHER_TENANT, idempotency_key="retry-1"))
    assert other_tenant.id != first.id
    assert list_all(store, TENANT, limit=10) == [first.id]

    # Once the job is deleted the key is free again.
    assert store.delete_job(first.id, TENANT)
    fresh = store.create_job(make_job(idempotency_key="retry-1"))
    assert fresh.id != first.id


def test_concurrent_creates_with_one_idempotency_key_make_one_job(store: JobStore) -> None:
    start = threading.Barrier(6)

    def create(_: int) -> str:
        start.wait(timeout=10)
        return store.create_job(make_job(idempotency_key="double-click")).id

    with ThreadPoolExecutor(max_workers=6) as pool:
        created_ids = set(pool.map(create, range(6)))
    assert len(created_ids) == 1
    assert list_all(store, TENANT, limit=10) == list(created_ids)


# -- claim


def test_claim_starts_an_attempt_that_holds_a_lease(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    claimed = store.claim(job.id, "worker-a", 30)
    assert claimed is not None
    assert claimed.status is JobStatus.running and claimed.lease_owner == "worker-a" and claimed.attempts == 1
    assert claimed.started_at == clock.now and claimed.lease_expires_at == clock.now + timedelta(seconds=30)
    assert store.get_job(job.id) == claimed
    # While the lease lives, nobody else gets the job, not even a redelivery to the same owner.
    assert store.claim(job.id, "worker-b", 30) is None
    assert store.claim(job.id, "worker-a", 30) is None
    assert store.claim("job_missing", "worker-b", 30) is None
    with pytest.raises(ValueError):
        store.claim(store.create_job(make_job()).id, "worker-a", 0)


def test_an_expired_lease_can_be_taken_over_and_the_old_owner_is_out(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    assert store.heartbeat(job.id, "worker-a", 30, stage=None, progress=0.0) is None  # not claimed yet
    store.claim(job.id, "worker-a", 30)
    store.heartbeat(job.id, "worker-a", 30, stage=Stage.prune, progress=0.4)
    clock.advance(31)
    taken = store.claim(job.id, "worker-b", 30)
    assert taken is not None and taken.lease_owner == "worker-b" and taken.attempts == 2
    assert taken.progress == 0.0 and taken.stage is None  # a new attempt starts over
    assert store.heartbeat(job.id, "worker-a", 30, stage=Stage.prune, progress=0.5) is None
    assert store.finish(job.id, "worker-a", JobStatus.succeeded) is None


def test_threads_racing_to_claim_get_each_job_exactly_once(store: JobStore) -> None:
    jobs = [store.create_job(make_job()) for _ in range(5)]
    owners = [f"worker-{index}" for index in range(8)]
    start = threading.Barrier(len(owners))

    def claim_all(owner: str) -> list[str]:
        start.wait(timeout=10)
        return [job.id for job in jobs if store.claim(job.id, owner, 30) is not None]

    with ThreadPoolExecutor(max_workers=len(owners)) as pool:
        won = list(pool.map(claim_all, owners))
    assert sorted(job_id for ids in won for job_id in ids) == sorted(job.id for job in jobs)
    assert all(store.get_job(job.id).attempts == 1 for job in jobs)  # type: ignore[union-attr]


def _claim_all_in_child(store_url: str, job_ids: list[str], owner: str, start: Any, results: Any) -> None:
    """Runs in a separate (spawned) process: opens its own store and claims what it can."""
    child_store = open_store(store_url)
    try:
        start.wait(timeout=60)
        results.put((owner, [job_id for job_id in job_ids if child_store.claim(job_id, owner, 60) is not None]))
    finally:
        child_store.close()


def test_processes_racing_to_claim_get_each_job_exactly_once(store: JobStore, store_url: str) -> None:
    jobs = [store.create_job(make_job()) for _ in range(15)]
    job_ids = [job.id for job in jobs]
    context = multiprocessing.get_context("spawn")
    owners = [f"process-{index}" for index in range(2)]
    start = context.Barrier(len(owners))
    results = context.Queue()
    # Each process walks the jobs from a different starting point, so they collide all along.
    children = [
        context.Process(target=_claim_all_in_child, args=(store_url, job_ids[index:] + job_ids[:index], owner, start, results))
        for index, owner in enumerate(owners)
    ]
    for child in children:
        child.start()
    try:
        won = dict(results.get(timeout=60) for _ in owners)
    finally:
        for child in children:
            child.join(timeout=30)
    assert all(child.exitcode == 0 for child in children)
    assert sorted(job_id for ids in won.values() for job_id in ids) == sorted(job_ids)
    for owner, ids in won.items():
        for job_id in ids:
            stored = store.get_job(job_id)
            assert stored is not None and stored.lease_owner == owner and stored.attempts == 1


def _claim_in_forked_child(store: JobStore, job_id: str, results: Any) -> None:
    """Runs in a forked process, using the store object it inherited from its parent."""
    claimed = store.claim(job_id, "forked-child", 60)
    results.put(None if claimed is None else claimed.lease_owner)


def test_a_store_keeps_working_on_both_sides_of_a_fork(store: JobStore) -> None:
    # Celery's prefork pool opens the store in the parent and forks its workers.
    parent_job = store.create_job(make_job())
    child_job = store.create_job(make_job())
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_claim_in_forked_child, args=(store, child_job.id, results))
    child.start()
    try:
        assert results.get(timeout=30) == "forked-child"
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    assert store.get_job(child_job.id).lease_owner == "forked-child"  # type: ignore[union-attr]
    assert store.claim(parent_job.id, "parent", 60) is not None


# -- heartbeat


def test_heartbeat_renews_the_lease_and_progress_never_goes_back(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 10)
    clock.advance(8)
    beat = store.heartbeat(job.id, "worker-a", 10, stage=Stage.score, progress=0.3)
    assert beat is not None and beat.lease_expires_at == clock.now + timedelta(seconds=10)
    assert beat.stage is Stage.score and beat.progress == 0.3
    clock.advance(8)  # past the first lease, inside the renewed one
    assert store.claim(job.id, "worker-b", 10) is None

    behind = store.heartbeat(job.id, "worker-a", 10, stage=None, progress=0.2)
    assert behind is not None and behind.progress == 0.3 and behind.stage is Stage.score
    ahead = store.heartbeat(job.id, "worker-a", 10, stage=Stage.finetune, progress=0.6)
    assert ahead is not None and ahead.progress == 0.6 and ahead.stage is Stage.finetune
    # 1.0 means succeeded; a running job never reports it.
    almost = store.heartbeat(job.id, "worker-a", 10, stage=Stage.export, progress=1.0)
    assert almost is not None and 0.6 < almost.progress < 1.0
    assert store.get_job(job.id) == almost


def test_heartbeat_by_someone_else_fails_and_changes_nothing(store: JobStore) -> None:
    job = store.create_job(make_job())
    claimed = store.claim(job.id, "worker-a", 30)
    assert store.heartbeat(job.id, "worker-b", 30, stage=Stage.prune, progress=0.9) is None
    assert store.heartbeat("job_missing", "worker-a", 30, stage=None, progress=0.1) is None
    assert store.get_job(job.id) == claimed
    with pytest.raises(ValueError):
        store.heartbeat(job.id, "worker-a", 30, stage=None, progress=float("nan"))


# -- finish


def test_finish_by_the_owner_succeeds_with_progress_one(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 30)
    store.heartbeat(job.id, "worker-a", 30, stage=Stage.export, progress=0.7)
    artifacts = [
        Artifact(name="model.ts", size_bytes=10, sha256="a" * 64),
        {"name": "report.json", "size_bytes": 2, "sha256": "b" * 64},
    ]
    assert store.finish(job.id, "worker-b", JobStatus.succeeded, metrics={"ratios": {"size": 0.5}}) is None
    assert store.get_job(job.id).status is JobStatus.running  # type: ignore[union-attr]

    clock.advance(1)
    done = store.finish(job.id, "worker-a", JobStatus.succeeded, metrics={"ratios": {"size": 0.5}}, artifacts=artifacts)
    assert done is not None and done.status is JobStatus.succeeded and done.progress == 1.0
    assert done.finished_at == clock.now and done.lease_owner is None and done.lease_expires_at is None
    assert done.metrics == {"ratios": {"size": 0.5}}
    assert [artifact.name for artifact in done.artifacts] == ["model.ts", "report.json"]
    assert store.get_job(job.id, TENANT) == done
    # Finished once; the attempt holds nothing any more.
    assert store.finish(job.id, "worker-a", JobStatus.failed) is None
    assert store.heartbeat(job.id, "worker-a", 30, stage=None, progress=0.1) is None
    assert store.claim(job.id, "worker-b", 30) is None


def test_a_failed_job_keeps_its_error_and_progress(store: JobStore) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 30)
    store.heartbeat(job.id, "worker-a", 30, stage=Stage.quantize, progress=0.5)
    error = JobError(code="compression_failed", message="the quantized model would not trace")
    failed = store.finish(job.id, "worker-a", JobStatus.failed, error=error)
    assert failed is not None and failed.status is JobStatus.failed and failed.error == error
    assert failed.progress == 0.5 and failed.stage is Stage.quantize


def test_illegal_transitions_are_refused(store: JobStore) -> None:
    job = store.create_job(make_job())
    # queued → succeeded: only a running attempt can finish.
    assert store.finish(job.id, "worker-a", JobStatus.succeeded) is None
    store.claim(job.id, "worker-a", 30)
    for not_an_ending in (JobStatus.running, JobStatus.queued):
        with pytest.raises(ValueError):
            store.finish(job.id, "worker-a", not_an_ending)
    done = store.finish(job.id, "worker-a", JobStatus.cancelled)
    assert done is not None and done.status is JobStatus.cancelled
    # Nothing leaves a terminal state: not a claim, not a cancel, not a finish.
    assert store.claim(job.id, "worker-a", 30) is None
    assert store.request_cancel(job.id, TENANT) == done
    assert store.finish(job.id, "worker-a", JobStatus.succeeded) is None
    assert store.get_job(job.id) == done


# -- cancel


def test_cancel_of_a_queued_job_is_immediate(store: JobStore) -> None:
    job = store.create_job(make_job())
    cancelled = store.request_cancel(job.id, TENANT)
    assert cancelled is not None and cancelled.status is JobStatus.cancelled and cancelled.finished_at is not None
    assert store.claim(job.id, "worker-a", 30) is None
    assert store.request_cancel("job_missing", TENANT) is None


def test_cancel_of_a_running_job_asks_its_worker_to_stop(store: JobStore) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 30)
    asked = store.request_cancel(job.id, TENANT)
    assert asked is not None and asked.status is JobStatus.running and asked.cancel_requested
    beat = store.heartbeat(job.id, "worker-a", 30, stage=Stage.finetune, progress=0.4)
    assert beat is not None and beat.cancel_requested
    stopped = store.finish(job.id, "worker-a", JobStatus.cancelled)
    assert stopped is not None and stopped.status is JobStatus.cancelled


def test_cancel_of_a_finished_job_returns_it_unchanged(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 30)
    done = store.finish(job.id, "worker-a", JobStatus.succeeded)
    clock.advance(5)
    assert store.request_cancel(job.id, TENANT) == done
    assert store.get_job(job.id) == done


# -- release (graceful hand-back)


def test_release_hands_the_job_back_without_using_up_an_attempt(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job(max_attempts=1))
    store.claim(job.id, "worker-a", 30)
    store.heartbeat(job.id, "worker-a", 30, stage=Stage.finetune, progress=0.4)
    clock.advance(1)
    assert store.release(job.id, "worker-b") is None  # only the owner may hand it back
    back = store.release(job.id, "worker-a")
    assert back is not None and back.status is JobStatus.queued and back.attempts == 0
    assert back.lease_owner is None and back.stage is None and back.progress == 0.0
    assert back.updated_at == clock.now and back.finished_at is None
    assert store.get_job(job.id) == back
    assert [queued.id for queued in store.list_jobs(TENANT, status=JobStatus.queued, limit=10)[0]] == [job.id]
    # The attempt is over: nothing it does later counts.
    assert store.release(job.id, "worker-a") is None
    assert store.heartbeat(job.id, "worker-a", 30, stage=None, progress=0.9) is None
    assert store.finish(job.id, "worker-a", JobStatus.succeeded) is None
    # Graceful stops, however many, never exhaust max_attempts (here 1): the next claim is attempt 1.
    for owner in ("worker-b", "worker-c"):
        again = store.claim(job.id, owner, 30)
        assert again is not None and again.attempts == 1 and again.lease_owner == owner
        assert store.release(job.id, owner) is not None
    last = store.claim(job.id, "worker-d", 30)
    assert last is not None and last.attempts == 1
    done = store.finish(job.id, "worker-d", JobStatus.succeeded)
    assert done is not None and done.status is JobStatus.succeeded and done.attempts == 1


def test_release_of_a_job_that_is_not_running_changes_nothing(store: JobStore) -> None:
    queued = store.create_job(make_job())
    assert store.release(queued.id, "worker-a") is None
    assert store.get_job(queued.id) == queued
    assert store.release("job_missing", "worker-a") is None
    finished = store.create_job(make_job())
    store.claim(finished.id, "worker-a", 30)
    done = store.finish(finished.id, "worker-a", JobStatus.failed, error=JobError(code="x", message="y"))
    assert store.release(finished.id, "worker-a") is None
    assert store.get_job(finished.id) == done


def test_release_of_a_job_whose_cancel_was_asked_ends_it_cancelled(store: JobStore) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 30)
    store.request_cancel(job.id, TENANT)
    # Queued again, the job could never be claimed (cancel requested): the stop is its outcome.
    ended = store.release(job.id, "worker-a")
    assert ended is not None and ended.status is JobStatus.cancelled and ended.finished_at is not None
    assert ended.lease_owner is None and ended.lease_expires_at is None
    assert store.claim(job.id, "worker-b", 30) is None
    assert job.id not in [unfinished.id for unfinished in store.unfinished_jobs()]


def test_a_released_job_nobody_claims_is_sent_again_once(store: JobStore, clock: SteppingClock) -> None:
    lost_message = store.create_job(make_job())
    delivered = store.create_job(make_job())
    for job in (lost_message, delivered):
        store.claim(job.id, "worker-a", 10)
        store.release(job.id, "worker-a")
    # The hand-back message of ``delivered`` arrived: its claim supersedes the deadline.
    assert store.claim(delivered.id, "worker-b", 600) is not None
    assert store.requeue_expired(clock.now + timedelta(seconds=5)) == []  # inside the deadline
    # Past it, the job whose message died with the worker is returned for a new message, once.
    resent = store.requeue_expired(clock.advance(11))
    assert [job.id for job in resent] == [lost_message.id]
    assert resent[0].status is JobStatus.queued and resent[0].attempts == 0 and resent[0].lease_expires_at is None
    assert store.requeue_expired(clock.advance(60)) == []
    assert store.get_job(delivered.id).status is JobStatus.running  # type: ignore[union-attr]
    taken = store.claim(lost_message.id, "worker-c", 10)
    assert taken is not None and taken.attempts == 1


def test_cancel_of_a_released_job_clears_its_redelivery_deadline(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 10)
    store.release(job.id, "worker-a")
    cancelled = store.request_cancel(job.id, TENANT)
    assert cancelled is not None and cancelled.status is JobStatus.cancelled and cancelled.lease_expires_at is None
    assert store.requeue_expired(clock.advance(60)) == []


# -- lease expiry


def test_requeue_expired_retries_then_fails_with_worker_lost(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job(max_attempts=2))
    alive = store.create_job(make_job())
    store.claim(job.id, "worker-a", 10)
    store.claim(alive.id, "worker-c", 600)
    assert store.requeue_expired(clock.now + timedelta(seconds=5)) == []

    requeued = store.requeue_expired(clock.advance(11))
    assert [again.id for again in requeued] == [job.id]
    assert requeued[0].status is JobStatus.queued and requeued[0].lease_owner is None and requeued[0].attempts == 1
    assert store.get_job(job.id) == requeued[0]
    assert store.get_job(alive.id).status is JobStatus.running  # type: ignore[union-attr]
    assert store.heartbeat(job.id, "worker-a", 10, stage=None, progress=0.1) is None

    second = store.claim(job.id, "worker-b", 10)
    assert second is not None and second.attempts == 2
    clock.advance(11)
    # Out of attempts: the redelivered task may not run it a third time either.
    assert store.claim(job.id, "worker-d", 10) is None
    # The job it ended is returned too, so that the caller can announce its end.
    [ended] = store.requeue_expired(clock.now)
    lost = store.get_job(job.id)
    assert lost is not None and lost == ended
    assert lost.status is JobStatus.failed and lost.finished_at == clock.now
    assert lost.error is not None and lost.error.code == "worker_lost"
    assert store.requeue_expired(clock.advance(60)) == []


def test_an_expired_job_whose_cancel_was_asked_ends_cancelled(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    store.claim(job.id, "worker-a", 10)
    store.request_cancel(job.id, TENANT)
    clock.advance(11)
    assert store.claim(job.id, "worker-b", 10) is None
    [ended] = store.requeue_expired(clock.now)
    assert ended.id == job.id and ended.status is JobStatus.cancelled
    assert store.get_job(job.id).status is JobStatus.cancelled  # type: ignore[union-attr]


def test_unfinished_jobs_are_the_queued_and_running_ones(store: JobStore) -> None:
    base = utcnow()
    queued, running, finished = (store.create_job(make_job(created_at=base + timedelta(seconds=index))) for index in range(3))
    store.claim(running.id, "worker-a", 30)
    store.request_cancel(finished.id, TENANT)
    elsewhere = store.create_job(make_job(tenant=OTHER_TENANT, created_at=base + timedelta(seconds=9)))
    # All tenants: this is the worker's start-up view, oldest first.
    assert [job.id for job in store.unfinished_jobs()] == [queued.id, running.id, elsewhere.id]


def test_status_counts_cover_every_tenant_and_follow_transitions(store: JobStore) -> None:
    assert store.status_counts() == dict.fromkeys(JobStatus, 0)
    queued, running, cancelled = (store.create_job(make_job()) for _ in range(3))
    store.create_job(make_job(tenant="tenant with spaces:and*glob"))
    store.claim(running.id, "worker-a", 30)
    store.request_cancel(cancelled.id, TENANT)
    counts = store.status_counts()
    assert counts == {**dict.fromkeys(JobStatus, 0), JobStatus.queued: 2, JobStatus.running: 1, JobStatus.cancelled: 1}
    store.finish(running.id, "worker-a", JobStatus.succeeded)
    store.delete_job(queued.id, TENANT)
    assert store.status_counts() == {**dict.fromkeys(JobStatus, 0), JobStatus.queued: 1, JobStatus.succeeded: 1, JobStatus.cancelled: 1}


# -- delete


def test_delete_removes_the_job_everywhere(store: JobStore, clock: SteppingClock) -> None:
    job = store.create_job(make_job())
    kept = store.create_job(make_job())
    store.claim(job.id, "worker-a", 10)
    assert store.delete_job(job.id, TENANT) is True
    assert store.get_job(job.id) is None
    assert list_all(store, TENANT, limit=10) == [kept.id]
    assert list_all(store, TENANT, status=JobStatus.running, limit=10) == []
    assert [unfinished.id for unfinished in store.unfinished_jobs()] == [kept.id]
    # The worker that was running it learns at its next heartbeat and stops.
    assert store.heartbeat(job.id, "worker-a", 10, stage=None, progress=0.5) is None
    assert store.requeue_expired(clock.advance(60)) == []
    assert store.delete_job(job.id, TENANT) is False


# -- uploads


def test_uploads_are_tenant_scoped(store: JobStore) -> None:
    upload = Upload(id=new_id("mdl"), tenant=TENANT, kind="model", format="torchscript", size_bytes=123, sha256="c" * 64)
    dataset = Upload(id=new_id("dat"), tenant=TENANT, kind="dataset", format="npz", size_bytes=9, sha256="d" * 64, num_samples=40)
    store.put_upload(upload)
    store.put_upload(dataset)
    assert store.get_upload(upload.id, TENANT) == upload
    assert store.get_upload(dataset.id, TENANT) == dataset
    assert store.get_upload(upload.id, OTHER_TENANT) is None
    assert store.delete_upload(upload.id, OTHER_TENANT) is False
    assert store.delete_upload(upload.id, TENANT) is True
    assert store.get_upload(upload.id, TENANT) is None
    assert store.delete_upload(upload.id, TENANT) is False


# -- health and opening


def test_ping_answers_and_open_store_picks_the_backend(store: JobStore, store_url: str) -> None:
    store.ping()
    reopened = open_store(store_url)
    try:
        expected_type = SQLiteJobStore if store_url.startswith("sqlite") else RedisJobStore
        assert isinstance(reopened, expected_type)
        job = store.create_job(make_job())
        assert reopened.get_job(job.id, TENANT) == job  # the same data, seen through a second client
    finally:
        reopened.close()


def test_open_store_refuses_unknown_urls() -> None:
    for url in ("postgres://db/jobs", "sqlite://", "sqlite:///", "jobs.sqlite3"):
        with pytest.raises(ValueError):
            open_store(url)


def test_redis_that_does_not_answer_is_store_unavailable() -> None:
    # Port 1 on loopback refuses at once, so this takes only the bounded retries.
    unreachable = RedisJobStore("redis://127.0.0.1:1/0", connect_timeout_seconds=0.5)
    with pytest.raises(StoreUnavailable):
        unreachable.ping()
    with pytest.raises(StoreUnavailable):
        unreachable.get_job("job_x")
    with pytest.raises(StoreUnavailable):
        unreachable.claim("job_x", "worker-a", 30)


def test_sqlite_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    not_a_database = tmp_path / "jobs.sqlite3"
    not_a_database.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StoreUnavailable):
        SQLiteJobStore(not_a_database)
    a_directory = tmp_path / "dir.sqlite3"
    a_directory.mkdir()
    with pytest.raises(StoreUnavailable):
        SQLiteJobStore(a_directory)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_sqlite_closes_the_connections_of_threads_that_ended(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)

    def open_database_files() -> int:
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(path))

    def use_from_short_lived_threads(count: int) -> None:
        # A threadpool retiring idle threads and starting new ones.
        for _ in range(count):
            thread = threading.Thread(target=store.get_job, args=(job.id,))
            thread.start()
            thread.join()

    try:
        job = store.create_job(make_job())
        use_from_short_lived_threads(5)
        settled = open_database_files()
        use_from_short_lived_threads(20)
        # (SQLite may keep a closed connection's descriptor for reuse, so not "== 1".)
        assert open_database_files() <= settled
    finally:
        store.close()


def test_sqlite_uses_wal_and_keeps_jobs_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteJobStore(path)
    job = first.create_job(make_job())
    first.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second = SQLiteJobStore(path)
    try:
        assert second.get_job(job.id, TENANT) == job
        second.ping()
    finally:
        second.close()
