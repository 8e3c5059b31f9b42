"""Soft and hard job time limits in real worker processes on Redis.

``tests/worker/test_runner.py`` covers the soft limit inside one process; here a worker
configured the way an operator would (COMPACTOR_JOB_SOFT_TIME_LIMIT / _HARD_TIME_LIMIT)
meets a job that fine-tunes past the soft limit and one stuck inside a single native call
(a forward pass that runs for a minute). Every job runs in a child process the worker kills
(worker/sandbox.py), so both end at the soft limit with ``timeout`` and both workers live on:
the hard limit, which used to end a stuck job by replacing the whole worker process, is now
only a backstop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from compactor.jobs import JobStatus
from tests.faults.cluster import ClusterFactory
from tests.faults.ledger import FaultRow, count_duplicated, count_lost, count_status, describe
from tests.support.jobs import QUICK_SPEC, finetune_spec

pytestmark = [pytest.mark.faults, pytest.mark.redis]

# Above the ~3 s of a fresh worker's first job (its sandbox fork server starts), so that only
# the jobs meant to run over it do.
SOFT_LIMIT_SECONDS = 6.0
HARD_LIMIT_SECONDS = 14.0
# What a kill of the job's child may add to the soft limit (polls, the store write).
KILL_SLACK_SECONDS = 5.0


class EndlessRefinement(nn.Module):
    """A forward that is one long loop inside TorchScript (an iterative refinement with a huge
    step count): a single call runs for a minute in native code, where the worker cannot check
    for cancellation — what the hard time limit is for."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flatten(x, 1)
        for _ in range(self.steps):
            y = torch.tanh(y)
        return self.head(y)


def test_soft_and_hard_time_limits_fail_with_timeout_and_no_artifacts(
    make_cluster: ClusterFactory, inputs: dict[str, Path], tmp_path: Path, record_row: Callable[[FaultRow], None]
) -> None:
    endless = tmp_path / "endless.ts"
    # ~3 µs a step: 20M steps is about a minute, far past both limits.
    torch.jit.save(torch.jit.script(EndlessRefinement(20_000_000)), str(endless))
    cluster = make_cluster(
        worker_env={
            "COMPACTOR_JOB_SOFT_TIME_LIMIT": str(SOFT_LIMIT_SECONDS),
            "COMPACTOR_JOB_HARD_TIME_LIMIT": str(HARD_LIMIT_SECONDS),
        }
    )
    cluster.start_workers(2)
    # Past the soft limit between two batches of fine-tuning.
    over_soft = cluster.submit(inputs["model"], finetune_spec(epochs=1000), inputs["dataset"])
    # Past the soft limit inside one forward that would run for a minute.
    over_hard = cluster.submit(endless, {"model": {"input_shape": [1, 1, 8, 8]}})
    quick = [cluster.submit(inputs["model"], QUICK_SPEC) for _ in range(2)]
    everything = [over_soft.id, over_hard.id] + [job.id for job in quick]

    jobs = cluster.wait_finished(everything, timeout=120)
    ledger = cluster.ledger()
    ledger.check_against_store(jobs)
    timed_out = [
        job_id
        for job_id in (over_soft.id, over_hard.id)
        if (job := jobs[job_id]) is not None and job.status is JobStatus.failed and job.error is not None and job.error.code == "timeout"
    ]
    record_row(
        FaultRow(
            "soft and hard time limits",
            len(everything),
            count_status(jobs, JobStatus.succeeded),
            len(timed_out),
            count_lost(jobs),
            count_duplicated(ledger, jobs),
            None,
            f"soft {SOFT_LIMIT_SECONDS:g} s: the job's child is killed, also inside a minute-long forward; workers live on",
        )
    )
    assert timed_out == [over_soft.id, over_hard.id], describe(ledger, jobs)
    for job_id in timed_out:
        job = jobs[job_id]
        assert job is not None and job.attempts == 1 and job.artifacts == [] and job.metrics is None
        leftovers = [path for path in cluster.storage.job_dir(job_id).rglob("*") if path.is_file()]
        assert leftovers == [], f"a timed-out job left files: {leftovers}"
    # Both ended at the soft limit, the stuck one too (its child was killed mid-forward), and
    # no worker process had to go.
    for job_id in timed_out:
        job = jobs[job_id]
        assert job is not None and job.started_at is not None and job.finished_at is not None
        ran = (job.finished_at - job.started_at).total_seconds()
        assert ran < SOFT_LIMIT_SECONDS + KILL_SLACK_SECONDS, f"{job_id} ran {ran:.1f} s"
    assert [worker.name for worker in cluster.live_workers()] == [w.name for w in cluster.workers]
    for job in quick:
        done = jobs[job.id]
        assert done is not None and done.status is JobStatus.succeeded and done.attempts == 1, describe(ledger, jobs)
