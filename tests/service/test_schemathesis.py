"""Schemathesis against the live OpenAPI document of a real ``compactor gateway`` process.

Every operation the document describes is called with generated data (valid and invalid),
with Alice's key: no answer is a server error, every status code, content type, header and
body is what the document says, invalid data is refused, and no ``/v1`` operation serves a
request without a key or with a wrong one (Schemathesis' ``ignored_auth`` re-sends each
successful call without the key and with an invented one). Then the operations that take
ids are called again with the ids of a real model, dataset and job, so that the 2xx
documents are checked too. The last tests walk the document and call every ``/v1``
operation without a valid key: each must answer 401.

No worker runs, so a queued job would stay queued, and its ``GET /v1/jobs/{id}/events``
stream would never end. Schemathesis cannot create a job (its generated files are never
valid models), and the one job made here is cancelled before any generated call: every
stream Schemathesis opens ends after one event, or is a 404. Each call also has a 10 s read
timeout (the stream's keep-alive is 15 s), so a stream could fail the run but never hang it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.gateway import ALICE, auth
from tests.support.live_gateway import LiveGateway

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
    negative_data_rejection,
    # Not positive_data_acceptance: the uploads are `format: binary` in the document, and
    # whether the bytes are a model or a dataset is decided by reading them (415/422 with
    # unsupported_model_format, invalid_dataset, ...), which no JSON Schema can say. Every
    # generated file is such a refusal, so that check would only report the API's design.
]
# A small budget per operation keeps this module near 25 s on two busy cores.
EXAMPLES_PER_OPERATION = 25
CALL_TIMEOUT_SECONDS = 10
UNAUTHENTICATED = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    root = tmp_path_factory.mktemp("schemathesis")
    server = LiveGateway(root / "data", root / "gateway.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openapi_document(gateway: LiveGateway) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(f"{gateway.base_url}/openapi.json", timeout=10).json()
    return document


def fuzz(operation: APIOperation, mode: GenerationMode, path_parameters: dict[str, str] | None = None) -> None:
    """Hypothesis over one operation's generated cases; raises on the first failing check."""

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=auth(ALICE), checks=CHECKS, timeout=CALL_TIMEOUT_SECONDS)

    run()


# (Not schemathesis.pytest.from_fixture: its pytest plugin does not run under pytest 9.)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid data", "invalid data"])
def test_every_operation_conforms_and_never_fails(gateway: LiveGateway, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    failures: list[str] = []
    tried: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)
        try:
            fuzz(operation, mode)
        except Unsatisfiable:
            # Invalid data needs something to make invalid: an operation whose parameters are
            # all free-form strings (or that has none) has no invalid request to generate.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # noqa: BLE001 - every operation's failure is reported, not just the first
            failures.append(f"{operation.label}: {exc}")
    assert len(tried) >= 11, tried
    assert not failures, "\n\n".join(failures)


def test_operations_on_existing_objects_conform(gateway: LiveGateway, files) -> None:
    """The same checks with the ids of a real model, dataset and job of Alice's, so that the
    2xx documents (ModelOut, DatasetOut, JobOut, the event stream) are checked too, not just
    404s. The job is cancelled first: its event stream ends after one event (a queued job's
    would stream until the job ends, which no worker here makes happen). DELETE goes last."""
    with httpx.Client(base_url=gateway.base_url, headers=auth(ALICE), timeout=CALL_TIMEOUT_SECONDS) as client:
        model = client.post("/v1/models", files={"file": ("m", files.torchscript)}).json()
        dataset = client.post("/v1/datasets", files={"file": ("d", files.dataset_npz)}).json()
        job = client.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"]}).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled", cancelled.text
    ids = {"job_id": job["id"], "model_id": model["id"], "dataset_id": dataset["id"]}
    schema = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    with_ids = [
        operation for operation in (result.ok() for result in schema.get_all_operations()) if any("{" + name + "}" in operation.path for name in ids)
    ]
    with_ids.sort(key=lambda operation: operation.method.upper() == "DELETE")
    failures: list[str] = []
    for operation in with_ids:
        fixed = {name: value for name, value in ids.items() if "{" + name + "}" in operation.path}
        try:
            fuzz(operation, GenerationMode.POSITIVE, path_parameters=fixed)
        except Exception as exc:  # noqa: BLE001 - every operation's failure is reported
            failures.append(f"{operation.label}: {exc}")
    assert len(with_ids) >= 7, [operation.label for operation in with_ids]
    assert not failures, "\n\n".join(failures)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for path, item in document["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                yield method.upper(), path


def test_document_declares_the_bearer_key_on_every_v1_operation(openapi_document: dict[str, Any]) -> None:
    schemes = openapi_document["components"]["securitySchemes"]
    names = [name for name, scheme in schemes.items() if (scheme["type"], scheme.get("scheme")) == ("http", "bearer")]
    assert names, schemes
    for method, path in operations(openapi_document):
        declared = openapi_document["paths"][path][method.lower()].get("security")
        if path.startswith("/v1/"):
            assert declared == [{names[0]: []}], (method, path, declared)
        else:
            assert path in UNAUTHENTICATED and not declared, (method, path, declared)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no key"),
        pytest.param({"Authorization": "Bearer not-a-key-of-anyone"}, id="wrong key"),
        pytest.param({"Authorization": f"Basic {ALICE}"}, id="not a bearer key"),
    ],
)
def test_without_a_valid_key_every_v1_operation_answers_401(gateway: LiveGateway, openapi_document: dict[str, Any], headers: dict[str, str]) -> None:
    """Before anything else: no validation error, no 404, no body read."""
    v1 = [(method, path) for method, path in operations(openapi_document) if path.startswith("/v1/")]
    assert len(v1) >= 9, v1
    with httpx.Client(base_url=gateway.base_url, timeout=CALL_TIMEOUT_SECONDS) as client:
        for method, path in v1:
            url = path.replace("{job_id}", "job_missing").replace("{model_id}", "mdl_missing")
            url = url.replace("{dataset_id}", "dst_missing").replace("{name}", "model.ts")
            assert "{" not in url, f"a path parameter this test does not fill: {path}"
            answer = client.request(method, url, headers=headers, content=b"{}" if method == "POST" else None)
            assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["code"] == "unauthorized"
            assert answer.headers["www-authenticate"].startswith("Bearer")


def test_a_path_outside_the_document_needs_no_key_to_be_unknown(gateway: LiveGateway) -> None:
    """(Unknown paths answer 404 with or without a key: nothing is learnt from the difference.)"""
    for headers in ({}, auth(ALICE)):
        answer = httpx.get(f"{gateway.base_url}/v1/nothing-here", headers=headers, timeout=CALL_TIMEOUT_SECONDS)
        assert (answer.status_code, answer.json()["code"]) == (404, "not_found")


def test_gateway_log_has_no_unhandled_error(gateway: LiveGateway) -> None:
    """Runs last in this module: whatever Schemathesis sent, the gateway logged no traceback."""
    log = Path(gateway.proc.log_path).read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
