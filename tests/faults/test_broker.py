"""Broker faults: a job that outlives Redis's visibility timeout, and Redis itself killed.

The visibility timeout: Redis hands an unacknowledged message to another consumer once it
is older than the timeout, whether or not the first one still works on it (acks_late means
the message is acknowledged only when the job ends). The lease is what keeps that second
delivery from running the job again.

The outage: a ``redis-server`` of this test's own (its own port and directory, AOF on —
the shared server is never touched) is SIGKILLed while jobs are queued and running, and
started again on the same files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from compactor.jobs import JobStatus, Stage, utcnow
from tests.faults.cluster import ClusterFactory
from tests.faults.ledger import FaultRow, count_duplicated, count_lost, count_status, describe
from tests.faults.visibility_worker import VISIBILITY_TIMEOUT_ENV
from tests.support.jobs import QUICK_SPEC, finetune_spec, free_port, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.redis]

RowRecorder = Callable[[FaultRow], None]
VISIBILITY_TIMEOUT_SECONDS = 2
REDIS_DOWN_SECONDS = 2.0
# Longer than the outage: a running job keeps its lease while the store is away.
OUTAGE_LEASE_SECONDS = 5.0


def test_a_job_longer_than_the_visibility_timeout_runs_once(make_cluster: ClusterFactory, inputs: dict[str, Path], record_row: RowRecorder) -> None:
    cluster = make_cluster(
        worker_module="tests.faults.visibility_worker",
        worker_env={VISIBILITY_TIMEOUT_ENV: str(VISIBILITY_TIMEOUT_SECONDS)},
    )
    cluster.start_workers(2)
    # Several times the visibility timeout (plus kombu's 1 s sweep): its message is handed out again.
    # ~2.4 s per 100 epochs here since jobs run in a warm child: 400 is several visibility timeouts.
    long = cluster.submit(inputs["model"], finetune_spec(epochs=400), inputs["dataset"])
    quick = [cluster.submit(inputs["model"], QUICK_SPEC) for _ in range(2)]
    everything = [long.id] + [job.id for job in quick]

    jobs = cluster.wait_finished(everything, timeout=120)
    ledger = cluster.ledger()
    ledger.check_against_store(jobs)
    redelivered = ledger.not_claimed.get(long.id, [])
    record_row(
        FaultRow(
            f"job runs past the broker's visibility timeout ({VISIBILITY_TIMEOUT_SECONDS} s here)",
            len(everything),
            count_status(jobs, JobStatus.succeeded),
            0,
            count_lost(jobs),
            count_duplicated(ledger, jobs),
            None,
            f"Redis redelivered it {len(redelivered)}× while it ran; the lease turned each delivery away",
        )
    )
    assert count_status(jobs, JobStatus.succeeded) == len(everything), describe(ledger, jobs)
    # The broker really did hand the running job out again (else this test proves nothing)...
    assert redelivered, "Redis never redelivered the long job's message; the scenario did not happen"
    # ...and the second delivery found it leased (or done) and ran nothing.
    assert all(reason.startswith(("running", "succeeded")) for reason in redelivered), redelivered
    final = jobs[long.id]
    assert final is not None and final.attempts == 1 and len(ledger.recorded[long.id]) == 1


class RedisServer:
    """A ``redis-server`` of the test's own, with AOF, restartable on the same files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.directory),
                    # What the README asks of production: every write logged; a write is in the
                    # file before its client gets the answer, so a killed process loses nothing
                    # acknowledged (fsync once a second: an OS crash could lose that second).
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--maxmemory-policy",
                    "noeviction",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def answering() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.BusyLoadingError:
                return False
            except redis.exceptions.ConnectionError:
                assert self.process is not None and self.process.poll() is None, (self.directory / "redis.log").read_text()
                return False

        try:
            wait_for(answering, 20, "redis-server to answer", interval=0.05)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def test_redis_killed_with_jobs_queued_and_running(
    make_cluster: ClusterFactory, inputs: dict[str, Path], tmp_path: Path, record_row: RowRecorder
) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("COMPACTOR_REQUIRE_REDIS") == "1":
            pytest.fail("COMPACTOR_REQUIRE_REDIS=1 but there is no redis-server to start")
        pytest.skip("no redis-server binary to start a private server")
    server = RedisServer(tmp_path / "redis")
    server.start()
    cluster = make_cluster(broker_url=server.url(10), store_url=server.url(11), lease_seconds=OUTAGE_LEASE_SECONDS)
    try:
        cluster.start_workers(2)
        # Long enough for both to be caught fine-tuning (a warm job child does ~40 epochs a second here).
        running = [cluster.submit(inputs["model"], finetune_spec(epochs=150), inputs["dataset"]) for _ in range(2)]
        queued = [cluster.submit(inputs["model"], QUICK_SPEC) for _ in range(4)]
        everything = [job.id for job in running + queued]

        def both_fine_tuning() -> bool:
            jobs = cluster.jobs([job.id for job in running]).values()
            return all(job is not None and job.status is JobStatus.running and job.stage is Stage.finetune for job in jobs)

        wait_for(both_fine_tuning, 90, "both workers to be fine-tuning", interval=0.05)
        killed_at = time.monotonic()
        server.kill()
        time.sleep(REDIS_DOWN_SECONDS)
        server.start()
        restarted = utcnow()

        def writing_again() -> bool:
            # A heartbeat, a claim or an outcome written after the restart.
            return any(job is not None and job.updated_at > restarted for job in cluster.jobs(everything).values())

        wait_for(writing_again, 60, "the workers to write to the restarted Redis", interval=0.05)
        recovery = time.monotonic() - killed_at

        jobs = cluster.wait_finished(everything, timeout=120)
        ledger = cluster.ledger()
        ledger.check_against_store(jobs)
        second_attempts = sum(1 for job in jobs.values() if job is not None and job.attempts > 1)
        record_row(
            FaultRow(
                f"Redis SIGKILLed for {REDIS_DOWN_SECONDS:g} s with 2 jobs running, 4 queued (AOF on)",
                len(everything),
                count_status(jobs, JobStatus.succeeded),
                0,
                count_lost(jobs),
                count_duplicated(ledger, jobs),
                recovery,
                f"recovery: from the kill (outage included) to the first write after the restart; {second_attempts} job(s) needed a second attempt",
            )
        )
        assert count_status(jobs, JobStatus.succeeded) == len(everything), describe(ledger, jobs)
        # Each job ran once: the queued messages came back from the AOF, and the running jobs kept
        # their leases through an outage shorter than the lease — including one that finished while
        # Redis was down (it waits to record its result instead of dropping it for a re-run).
        assert second_attempts == 0, describe(ledger, jobs)
    finally:
        cluster.close()  # before the server goes: a stopping worker still talks to its broker
        server.stop()
