"""The worker's job and stage duration series, observed from the finished job record."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import REGISTRY

from compactor.jobs import Job, JobError, JobStatus, utcnow
from worker.metrics import observe_finished_job


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_finished_job_adds_its_duration_and_its_stage_times() -> None:
    started = utcnow()
    job = Job(
        id="job_m1",
        tenant="acme",
        model_id="mdl_1",
        status=JobStatus.succeeded,
        started_at=started,
        finished_at=started + timedelta(seconds=42),
        metrics={"stages": [{"name": "finetune", "seconds": 30.5}, {"name": "export", "seconds": 0.2}]},
    )
    before = {
        "count": sample("compactor_job_duration_seconds_count", status="succeeded"),
        "sum": sample("compactor_job_duration_seconds_sum", status="succeeded"),
        "finetune": sample("compactor_stage_duration_seconds_sum", stage="finetune"),
        "le60": sample("compactor_job_duration_seconds_bucket", status="succeeded", le="60.0"),
        "le30": sample("compactor_job_duration_seconds_bucket", status="succeeded", le="30.0"),
    }
    observe_finished_job(job)
    assert sample("compactor_job_duration_seconds_count", status="succeeded") == before["count"] + 1
    assert sample("compactor_job_duration_seconds_sum", status="succeeded") == before["sum"] + 42
    assert sample("compactor_job_duration_seconds_bucket", status="succeeded", le="60.0") == before["le60"] + 1
    assert sample("compactor_job_duration_seconds_bucket", status="succeeded", le="30.0") == before["le30"]
    assert sample("compactor_stage_duration_seconds_sum", stage="finetune") == before["finetune"] + 30.5


def test_a_failed_job_is_counted_with_its_error_code() -> None:
    before = sample("compactor_jobs_finished_total", status="failed", code="timeout")
    job = Job(id="job_m2", tenant="acme", model_id="mdl_1", status=JobStatus.failed, error=JobError(code="timeout", message="too long"))
    observe_finished_job(job)  # never started: no duration, still counted
    assert sample("compactor_jobs_finished_total", status="failed", code="timeout") == before + 1
