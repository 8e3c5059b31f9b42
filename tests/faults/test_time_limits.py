"""Soft and hard job time limits in real worker processes on Redis.

``tests/worker/test_runner.py`` covers the soft limit inside one process; here a worker
configured the way an operator would (COMPACTOR_JOB_SOFT_TIME_LIMIT / _HARD_TIME_LIMIT)
meets a job that stops itself at the soft limit and one stuck where it cannot check,
which only the hard limit ends — by failing the job and replacing the worker process.
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
from tests.worker.support import QUICK_SPEC, finetune_spec

pytestmark = [pytest.mark.faults, pytest.mark.redis]

# Above the ~3 s of a fresh worker's first job (its sandbox fork server starts), so that only
# the jobs meant to run over it do.
SOFT_LIMIT_SECONDS = 6.0
# A stuck job is failed 5 s (worker/runner.py HARD_LIMIT_MARGIN_SECONDS) before the hard limit,
# here at 9 s: the fine-tuning job has 3 s to stop the gentle way first.
HARD_LIMIT_SECONDS = 14.0
EXIT_HARD_TIMEOUT = 70  # worker/tasks.py


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
    # Past the soft limit between two batches of fine-tuning: the core stops itself.
    over_soft = cluster.submit(inputs["model"], finetune_spec(epochs=1000), inputs["dataset"])
    # Past the hard limit inside one forward: the worker records the timeout and exits.
    over_hard = cluster.submit(endless, {"model": {"input_shape": [1, 1, 8, 8]}})
    quick = [cluster.submit(inputs["model"], QUICK_SPEC) for _ in range(2)]
    everything = [over_soft.id, over_hard.id] + [job.id for job in quick]

    jobs = cluster.wait_finished(everything, timeout=120)
    ledger = cluster.ledger()
    ledger.check_against_store(jobs)
    timed_out = [
        job_id for job_id in (over_soft.id, over_hard.id)
        if (job := jobs[job_id]) is not None and job.status is JobStatus.failed and job.error is not None and job.error.code == "timeout"
    ]
    record_row(
        FaultRow(
            "soft and hard time limits",
            len(everything), count_status(jobs, JobStatus.succeeded), len(timed_out), count_lost(jobs),
            count_duplicated(ledger, jobs), None,
            f"soft {SOFT_LIMIT_SECONDS:g} s: the job stops itself; hard: the worker fails it and exits {EXIT_HARD_TIMEOUT}",
        )
    )
    assert timed_out == [over_soft.id, over_hard.id], describe(ledger, jobs)
    for job_id in timed_out:
        job = jobs[job_id]
        assert job is not None and job.attempts == 1 and job.artifacts == [] and job.metrics is None
        leftovers = [path for path in cluster.storage.job_dir(job_id).rglob("*") if path.is_file()]
        assert leftovers == [], f"a timed-out job left files: {leftovers}"
    # The worker stuck in the endless forward exits (its supervisor starts a fresh one); the one
    # whose job stopped at the soft limit lives on.
    (hard_attempt,) = ledger.attempts[over_hard.id]
    (stuck,) = [worker for worker in cluster.workers if worker.pid == hard_attempt.pid]
    assert stuck.proc.process.wait(timeout=30) == EXIT_HARD_TIMEOUT
    assert [worker.name for worker in cluster.live_workers()] == [w.name for w in cluster.workers if w is not stuck]
    for job in quick:
        done = jobs[job.id]
        assert done is not None and done.status is JobStatus.succeeded and done.attempts == 1, describe(ledger, jobs)
