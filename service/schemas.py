"""Response and request models of the HTTP API (what clients see; never tenants, leases or paths)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from compactor.documents import JobOut, job_json
from compactor.jobs import Job, Upload
from compactor.spec import JobSpec


def job_response(job: Job, status_code: int = 200) -> Response:
    """``JobOut.of(job)`` as a JSON response, serialized once by pydantic-core (``job_json``).

    Byte for byte what FastAPI writes for ``response_model=JobOut`` (compact UTF-8 JSON,
    fields in model order), without FastAPI's second validation pass over the model."""
    return Response(job_json(job), status_code=status_code, media_type="application/json")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ModelOut(BaseModel):
    id: str
    format: str = Field(examples=["torchscript"])
    size_bytes: int
    sha256: str

    @classmethod
    def of(cls, upload: Upload) -> ModelOut:
        return cls(id=upload.id, format=upload.format, size_bytes=upload.size_bytes, sha256=upload.sha256)


class DatasetOut(BaseModel):
    id: str
    format: str = Field(examples=["npz"])
    num_samples: int
    size_bytes: int
    sha256: str

    @classmethod
    def of(cls, upload: Upload) -> DatasetOut:
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
