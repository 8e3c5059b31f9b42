"""Response and request models of the HTTP API (what clients see; never tenants, leases or paths)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from compactor.jobs import Job, JobStatus, Stage, Upload
from compactor.spec import JobSpec


class JobErrorOut(BaseModel):
    code: str
    message: str


class ArtifactOut(BaseModel):
    name: str = Field(examples=["model.ts"])
    size_bytes: int
    sha256: str
    url: str = Field(examples=["/v1/jobs/job_abc/artifacts/model.ts"])


class JobOut(BaseModel):
    """A compression job as clients see it."""

    id: str
    status: JobStatus
    stage: Stage | None
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    spec: dict[str, Any] = Field(description="The full job spec with defaults filled in.")
    error: JobErrorOut | None
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactOut]
    cancel_requested: bool = Field(description="A cancel was asked for and a running job will stop at its next batch.")
    model_id: str = Field(description="The uploaded model this job compresses (reusable in other jobs).")
    dataset_id: str | None = Field(description="The uploaded dataset, if any.")

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        return cls(
            id=job.id,
            status=job.status,
            stage=job.stage,
            progress=job.progress,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            spec=job.spec,
            error=JobErrorOut(code=job.error.code, message=job.error.message) if job.error else None,
            metrics=job.metrics,
            artifacts=[
                ArtifactOut(
                    name=a.name, size_bytes=a.size_bytes, sha256=a.sha256, url=f"/v1/jobs/{job.id}/artifacts/{a.name}"
                )
                for a in job.artifacts
            ],
            cancel_requested=job.cancel_requested,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
        )


def job_response(job: Job, status_code: int = 200) -> Response:
    """``JobOut.of(job)`` as a JSON response, serialized once by pydantic-core.

    Byte for byte what FastAPI writes for ``response_model=JobOut`` (compact UTF-8 JSON,
    fields in model order), without FastAPI's second validation pass over the model."""
    body = JobOut.__pydantic_serializer__.to_json(JobOut.of(job))
    return Response(body, status_code=status_code, media_type="application/json")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ModelOut(BaseModel):
    id: str
    format: str = Field(examples=["torchscript"])
    size_bytes: int
    sha256: str

    @classmethod
    def of(cls, upload: Upload) -> "ModelOut":
        return cls(id=upload.id, format=upload.format, size_bytes=upload.size_bytes, sha256=upload.sha256)


class DatasetOut(BaseModel):
    id: str
    format: str = Field(examples=["npz"])
    num_samples: int
    size_bytes: int
    sha256: str

    @classmethod
    def of(cls, upload: Upload) -> "DatasetOut":
        return cls(
            id=upload.id,
            format=upload.format,
            num_samples=upload.num_samples or 0,
            size_bytes=upload.size_bytes,
            sha256=upload.sha256,
        )


class JobRequest(JobSpec):
    """A job spec that names earlier uploads (the `application/json` form of `POST /v1/jobs`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="JobRequest", protected_namespaces=())

    model_id: str = Field(min_length=1, max_length=100, description="id returned by POST /v1/models")
    dataset_id: str | None = Field(default=None, min_length=1, max_length=100, description="id returned by POST /v1/datasets")

    def to_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(exclude={"model_id", "dataset_id"}))


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] | None = None
    queue_depth: int | None = None
