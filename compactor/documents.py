"""The wire documents: the job as clients see it, and its report, as pydantic models (no torch).

One definition serves ``GET /v1/jobs/{id}`` (the route and its fast path), the job list, the
event stream and the webhooks' body, so they cannot drift; the OpenAPI document shows every field
of the report. ``job_json`` is the one serializer all of them send.

The report is stored as the worker wrote it (a JSON object in the job record). Its models accept
what earlier versions stored: every field is optional, unknown fields are kept, and a document
carries exactly the fields its report has (serialized with ``exclude_unset``), so an old record
reads back as it was.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from compactor.jobs import Job, JobStatus, Stage


class _Open(BaseModel):
    # Reports of earlier versions may lack a field or carry one more: both stay readable. A field
    # the report did not have is not invented on the way out: documents are serialized with
    # exclude_unset (``job_json``, and ``response_model_exclude_unset`` on the routes).
    model_config = ConfigDict(extra="allow")


class Percentiles(_Open):
    p50: float = Field(description="Median latency, milliseconds.")
    p90: float | None = None
    runs: int | None = Field(default=None, description="Timed calls (adaptive: fewer for slow models).")
    iqr_ms: float | None = Field(default=None, description="Interquartile range of the timed calls, milliseconds.")


class Latency(_Open):
    cpu: dict[str, Percentiles] = Field(default_factory=dict, description="By batch size: batch_1, batch_32.")
    cuda: dict[str, Percentiles] | None = Field(default=None, description="Only when the job ran on a GPU.")


class Accuracy(_Open):
    top1: float
    top5: float | None = None
    samples: int | None = None


class ModelFigures(_Open):
    """One side of the comparison: the original or the compressed model."""

    params: int | None = None
    nonzero_params: int | None = None
    size_bytes: int | None = Field(default=None, description="Bytes of the TorchScript file.")
    macs: int | None = None
    latency_ms: Latency | None = None
    accuracy: Accuracy | None = Field(default=None, description="Validation accuracy; null without labelled data.")


class Ratios(_Open):
    """Compressed over original; speedups original over compressed (p50)."""

    size: float | None = None
    params: float | None = None
    nonzero_params: float | None = None
    macs: float | None = None
    speedup_batch_1: float | None = Field(
        default=None,
        description="The recommended artifact in its runtime against the original in the original's fastest runtime (TorchScript or ONNX Runtime).",
    )
    speedup_batch_32: float | None = Field(default=None, description="As speedup_batch_1, at batch 32.")
    speedup_same_runtime_batch_1: float | None = Field(default=None, description="The recommended artifact against the original in the same runtime.")
    speedup_same_runtime_batch_32: float | None = None


class RuntimeRow(_Open):
    """One model in one runtime, timed in the same process as every other row."""

    model: str = Field(description="'original' or 'compressed'.")
    artifact: str | None = Field(default=None, description="The artifact file; null for the original.")
    runtime: str = Field(examples=["torchscript", "onnxruntime", "torch.export"])
    precision: str = Field(examples=["fp32", "int8"])
    size_bytes: int | None = None
    latency_ms: dict[str, Percentiles] = Field(default_factory=dict, description="By batch size: batch_1, batch_32.")
    accuracy: Accuracy | None = None
    top1_agreement: float | None = Field(default=None, description="Share of validation inputs where it predicts the original's class.")
    speedup_same_runtime: dict[str, float | None] | None = None
    speedup_vs_best_original: dict[str, float | None] | None = None


class Recommendation(_Open):
    """The fastest artifact within the accuracy budget at one batch size."""

    artifact: str
    runtime: str
    precision: str | None = None
    p50_ms: float | None = None
    speedup: float | None = Field(default=None, description="Against the original in its fastest runtime.")
    speedup_same_runtime: float | None = None
    accuracy_floor: float | None = Field(
        default=None,
        description="Lowest top-1 (or agreement, without targets) an artifact needed: the target's budget, else the best less 0.5 point.",
    )


class Fidelity(_Open):
    top1_agreement: float | None = None
    output_cosine: float | None = None
    samples: int | None = None


class LayerRow(_Open):
    name: str
    type: str | None = None
    params: int | None = None
    sparsity: float | None = None
    channels_before: int | None = None
    channels_after: int | None = None


class StageTime(_Open):
    name: str
    seconds: float


class SearchPoint(_Open):
    amount: float
    top1: float | None = None
    accuracy_drop: float | None = None
    within_budget: bool | None = None


class Search(_Open):
    max_accuracy_drop: float | None = None
    budget_met: bool | None = None
    chosen_amount: float | None = None
    accuracy_drop: float | None = None
    missed_by: float | None = None
    points: list[SearchPoint] = Field(default_factory=list)


class PruneSummary(_Open):
    amount: float | None = None
    granularity: str | None = None
    criterion: str | None = None


class FinetuneSummary(_Open):
    epochs: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    distilled: bool | None = None


class FloatLayer(_Open):
    name: str
    type: str | None = None
    reason: str | None = None


class QuantizationSummary(_Open):
    mode: str | None = None
    backend: str | None = None
    calibration_batches: int | None = None
    float_layers: list[FloatLayer] = Field(default_factory=list, description="Layers left in FP32, and why.")


class QuantizedForm(_Open):
    form: str
    p50_ms: dict[str, float] | None = Field(default=None, description="Probe latency by batch size (batch_1, batch_8).")
    error: str | None = None


class ExportCheck(_Open):
    ok: bool | None = None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    quantized: bool | None = None
    int8: bool | None = Field(default=None, description="model.pt2 and model.onnx: false (the float compressed model); model.int8.onnx: true.")
    # model.int8.onnx: ONNX Runtime's quantizer, the form it kept and every form it timed.
    quantizer: str | None = None
    mode: str | None = None
    form: str | None = Field(default=None, description="model.int8.onnx: the fastest INT8 form on the worker's CPU, e.g. 'qdq_u8s8'.")
    per_channel: bool | None = None
    calibration_batches: int | None = None
    max_abs_diff_vs_float: float | None = None
    output_scale: float | None = None
    candidates: list[QuantizedForm] = Field(default_factory=list)


class Structure(_Open):
    """How the upload's architecture was recovered as a graph with real layers."""

    graph: str | None = Field(default=None, description="'torch.export' where the job worked on an ATen graph; null where it could not.")
    converted_from: str | None = Field(default=None, description="'torchscript' for an upload converted in the job.")
    layers_rebuilt: int | None = None
    calls_left: list[str] = Field(default_factory=list, description="Layer calls left as ATen calls, and why.")
    conversion_failed: str | None = Field(default=None, description="Why a TorchScript upload stayed a program.")


class DatasetSummary(_Open):
    synthetic: bool | None = None
    train_samples: int | None = None
    val_samples: int | None = None


class Environment(_Open):
    torch: str | None = None
    device: str | None = None
    cuda_device: str | None = None
    quantization_backend: str | None = None
    cpu_threads: int | None = None
    python: str | None = None
    platform: str | None = None
    input_shape: list[int] | None = None
    num_classes: int | None = None
    model_format: str | None = None
    structure: Structure | None = Field(default=None, description="Null for a model built from model.arch.")
    dataset: DatasetSummary | None = None


class Report(_Open):
    """What a succeeded job measured (also its ``report.json``)."""

    original: ModelFigures | None = None
    compressed: ModelFigures | None = None
    ratios: Ratios | None = None
    fidelity: Fidelity | None = None
    runtimes: list[RuntimeRow] = Field(default_factory=list, description="The original and every artifact, each in its runtime.")
    recommended: dict[str, Recommendation] = Field(default_factory=dict, description="By batch size: what to deploy.")
    layers: list[LayerRow] = Field(default_factory=list)
    stages: list[StageTime] = Field(default_factory=list, description="Wall-clock seconds per stage.")
    search: Search | None = Field(default=None, description="The target search's points; null without a target.")
    prune: PruneSummary | None = None
    finetune: list[FinetuneSummary] = Field(default_factory=list)
    quantization: QuantizationSummary | None = None
    export_check: ExportCheck | None = None
    artifact_checks: dict[str, ExportCheck] = Field(default_factory=dict, description="Each artifact's reload check, by artifact name.")
    environment: Environment | None = None
    warnings: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


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
    # left_to_right: a report is read as a Report where it is one; a stored record this version
    # cannot read as one (hand-written, or of a shape long gone) is returned as it was stored.
    metrics: Annotated[Report | dict[str, Any], Field(union_mode="left_to_right")] | None = Field(
        description="The report of a succeeded job (report.json); null before."
    )
    artifacts: list[ArtifactOut]
    cancel_requested: bool = Field(description="A cancel was asked for and a running job will stop at its next batch.")
    model_id: str = Field(description="The uploaded model this job compresses (reusable in other jobs).")
    dataset_id: str | None = Field(description="The uploaded dataset, if any.")

    @classmethod
    def of(cls, job: Job) -> JobOut:
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
                ArtifactOut(name=a.name, size_bytes=a.size_bytes, sha256=a.sha256, url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in job.artifacts
            ],
            cancel_requested=job.cancel_requested,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
        )


def job_json(job: Job) -> bytes:
    """The job document as compact UTF-8 JSON: what the route, its fast path, the event stream
    and the webhooks send (FastAPI writes the same bytes for ``response_model=JobOut``)."""
    # JobOut.of sets every field of the job document; only a report's fields may be unset.
    return JobOut.__pydantic_serializer__.to_json(JobOut.of(job), exclude_unset=True)


__all__ = ["ArtifactOut", "JobErrorOut", "JobOut", "Report", "job_json"]
