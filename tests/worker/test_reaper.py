"""The reaper on a real SQLite store: re-enqueues expired jobs, announces the ones it ends."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from compactor.jobs import Job, JobStatus, new_id, utcnow
from compactor.store.sqlite import SQLiteJobStore
from worker.reaper import Reaper


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


def _job(**fields: object) -> Job:
    return Job(id=new_id("job"), tenant="acme", model_id="mdl_1", **fields)  # type: ignore[arg-type]


def test_expired_jobs_are_re_enqueued_and_jobs_out_of_attempts_are_announced(tmp_path: Path, monkeypatch) -> None:
    clock = Clock()
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite3"), clock=clock)
    retry = store.create_job(_job())
    lost = store.create_job(_job(max_attempts=1, spec={"notify": {"url": "https://hooks.example.com/x"}}))
    healthy = store.create_job(_job())
    for job in (retry, lost):
        assert store.claim(job.id, "dead-worker/1/t/n", 5) is not None
    assert store.claim(healthy.id, "live-worker/1/t/n", 600) is not None

    enqueued: list[tuple[str, int]] = []
    ended: list[Job] = []
    reaper = Reaper(store, lambda job_id, attempt: enqueued.append((job_id, attempt)), interval=1, on_ended=ended.append)
    # The reaper reads utcnow(); move the store's clock and the reaper's together.
    later = clock.now + timedelta(seconds=6)
    monkeypatch.setattr("worker.reaper.utcnow", lambda: later)
    clock.now = later

    assert reaper.reap_once() == [retry.id]
    assert enqueued == [(retry.id, 2)]
    assert [job.id for job in ended] == [lost.id]
    assert ended[0].status is JobStatus.failed and ended[0].error is not None and ended[0].error.code == "worker_lost"
    assert store.get_job(healthy.id).status is JobStatus.running  # type: ignore[union-attr]
    # Nothing twice: the next pass finds nothing to do.
    assert reaper.reap_once() == [] and len(ended) == 1
    store.close()


def test_an_announcement_that_fails_is_logged_and_the_reaper_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    clock = Clock()
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite3"), clock=clock)
    lost = store.create_job(_job(max_attempts=1))
    store.claim(lost.id, "dead-worker/1/t/n", 5)

    def broken(job: Job) -> None:
        raise ConnectionError("broker down")

    reaper = Reaper(store, lambda job_id, attempt: None, interval=1, on_ended=broken)
    later = clock.now + timedelta(seconds=6)
    monkeypatch.setattr("worker.reaper.utcnow", lambda: later)
    clock.now = later
    assert reaper.reap_once() == []
    assert store.get_job(lost.id).status is JobStatus.failed  # type: ignore[union-attr]
    assert f"job {lost.id}: its end could not be announced: broker down" in caplog.text
    store.close()
