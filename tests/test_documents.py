"""The wire documents (compactor/documents.py): the core's report fits the model exactly, stored
reports of any age read back as they were stored, and OpenAPI shows the report's fields."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from compactor.documents import JobOut, Report, job_json
from compactor.jobs import Job, JobStatus
from compactor.spec import JobSpec
from tests.support.live_server import METRICS
from worker.compression.data import Dataset, split_dataset
from worker.compression.pipeline import BenchmarkOptions, compress


def _undeclared(model: BaseModel, where: str = "report") -> list[str]:
    """Every field of a validated document that its model does not declare, at any depth."""
    found = [f"{where}.{key}" for key in model.__pydantic_extra__ or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if isinstance(item, BaseModel):
                found += _undeclared(item, f"{where}.{name}" + (f"[{index}]" if isinstance(value, list) else ""))
    return found


def test_the_cores_report_is_the_documented_report(tiny_cnn, digits) -> None:
    train_x, train_y, _, _ = digits
    spec = JobSpec.model_validate(
        {
            "model": {"input_shape": [1, 1, 8, 8]},
            "prune": {"granularity": "channel", "amount": 0.3},
            "finetune": {"epochs": 1},
            "quantize": {},
            "target": {"max_accuracy_drop": 0.5, "max_trials": 2},
        }
    )
    data = split_dataset(Dataset(train_x[:300], train_y[:300]), 0.2, seed=0)
    metrics = compress(tiny_cnn, spec, data, benchmark=BenchmarkOptions(warmup=1, runs=2)).metrics
    report = Report.model_validate(metrics)
    # Every field the core writes is declared (so OpenAPI documents it), and nothing is lost.
    assert _undeclared(report) == []
    assert json.loads(report.model_dump_json(exclude_unset=True)) == json.loads(json.dumps(metrics))


def _job(metrics: dict[str, Any] | None) -> Job:
    return Job(id="job_1", tenant="t", status=JobStatus.succeeded, spec={}, model_id="mdl_1", metrics=metrics)


def test_a_stored_report_reads_back_as_it_was_stored() -> None:
    # An early report without most sections, and one with a field this version does not know.
    for stored in (METRICS, {**METRICS, "tomorrow": {"a": 1}, "ratios": {**METRICS["ratios"], "speedup_batch_8": 3.0}}):
        document = json.loads(job_json(_job(stored)))
        assert document["metrics"] == stored
    assert json.loads(job_json(_job(None)))["metrics"] is None
    # A record that is no report this version can read is still returned as stored, not a 500.
    odd = {"compressed": {"top1": 0.9, "latency_ms": "n/a"}, "ratios": [1, 2]}
    assert json.loads(job_json(_job(odd)))["metrics"] == odd
    assert isinstance(JobOut.of(_job(METRICS)).metrics, Report)


def test_openapi_shows_the_reports_fields(make_settings) -> None:
    from service.app import create_app

    schema = create_app(make_settings()).openapi()["components"]["schemas"]
    metrics = schema["JobOut"]["properties"]["metrics"]
    assert {"$ref": "#/components/schemas/Report"} in metrics["anyOf"]
    assert {"original", "compressed", "ratios", "layers", "search", "quantization"} <= set(schema["Report"]["properties"])
    assert "top1" in schema["Accuracy"]["properties"]
