"""spec.notify.url at the gateway: refused at submission unless allowlisted and signable; announced on cancel.

The real app, store, storage and filesystem broker (no worker: what the gateway sends is read
off the broker's folder)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from compactor.documents import JobOut
from compactor.jobs import Artifact, Job, JobError, JobStatus, Stage, utcnow
from compactor.webhooks import job_document, payload_for
from service.app import create_app
from service.schemas import job_response
from tests.support.gateway import ALICE, BOB, auth, broker_messages, stored_files

pytestmark = pytest.mark.anyio

ALICE_SECRET = "alice-webhook-secret-0123456789"
ALLOWED = "https://hooks.example.com/compactor?token=abc"
SPEC = {"quantize": {"mode": "dynamic"}}


@pytest.fixture()
def settings(make_settings):
    # Overrides conftest's: webhooks on, for alice only (bob has no signing secret).
    return make_settings(webhook_allowed_hosts="hooks.example.com,*.ci.example.com:8443", webhook_secrets=f"alice:{ALICE_SECRET}")


async def submit(client: httpx.AsyncClient, model: bytes, url: str, key: str | None = ALICE) -> httpx.Response:
    files = {"model": ("model.ts", model), "spec": (None, json.dumps({**SPEC, "notify": {"url": url}}), "application/json")}
    return await client.post("/v1/jobs", files=files, headers=auth(key) if key else {})


def assert_refused_at_notify_url(response: httpx.Response, *needles: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "invalid_spec"
    assert ["spec", "notify", "url"] in [error["loc"] for error in problem["errors"]], problem
    for needle in needles:
        assert needle in response.text, problem


@pytest.mark.parametrize(
    "url, needle",
    [
        ("https://evil.example.net/hook", "COMPACTOR_WEBHOOK_ALLOWED_HOSTS"),
        ("https://build.ci.example.com/hook", "COMPACTOR_WEBHOOK_ALLOWED_HOSTS"),  # that pattern is pinned to 8443
        ("http://169.254.169.254/latest/meta-data/", "COMPACTOR_WEBHOOK_ALLOWED_HOSTS"),
        ("http://127.0.0.1:8000/v1/jobs", "COMPACTOR_WEBHOOK_ALLOWED_HOSTS"),
        ("file:///etc/passwd", "http and https"),
        ("http://hooks.example.com@evil.com/", "credentials"),
        ("http://evil.com#@hooks.example.com", "fragment"),
    ],
)
async def test_notify_urls_the_server_will_not_call_are_refused_and_nothing_is_kept(client, files, settings, url, needle) -> None:
    response = await submit(client, files.torchscript, url)
    assert_refused_at_notify_url(response, needle)
    assert stored_files(settings) == [] and broker_messages(settings) == []


async def test_a_tenant_without_a_signing_secret_is_told_what_the_operator_must_configure(client, files, settings) -> None:
    response = await submit(client, files.torchscript, ALLOWED, key=BOB)
    assert_refused_at_notify_url(response, "'bob'", "COMPACTOR_WEBHOOK_SECRETS")
    assert stored_files(settings) == [] and broker_messages(settings) == []


async def test_json_submission_is_checked_the_same_way(client, files, settings) -> None:
    model = await client.post("/v1/models", files={"file": ("m.ts", files.torchscript)}, headers=auth(ALICE))
    assert model.status_code == 201, model.text
    body = {"model_id": model.json()["id"], **SPEC, "notify": {"url": "https://evil.example.net/"}}
    refused = await client.post("/v1/jobs", json=body, headers=auth(ALICE))
    assert_refused_at_notify_url(refused, "evil.example.net")
    body["notify"] = {"url": "ftp://hooks.example.com/"}
    assert_refused_at_notify_url(await client.post("/v1/jobs", json=body, headers=auth(ALICE)), "http and https")
    body["notify"] = {"url": ALLOWED}
    accepted = await client.post("/v1/jobs", json=body, headers=auth(ALICE))
    assert accepted.status_code == 202, accepted.text


async def test_webhooks_are_off_without_an_allowlist(make_settings, files) -> None:
    app = create_app(make_settings(webhook_secrets=f"alice:{ALICE_SECRET}"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await submit(client, files.torchscript, ALLOWED)
    app.state.resources.close()
    assert_refused_at_notify_url(response, "not enabled", "COMPACTOR_WEBHOOK_ALLOWED_HOSTS")


async def test_an_unreadable_secrets_file_is_a_503_not_a_500(make_settings, files, tmp_path: Path) -> None:
    app = create_app(make_settings(webhook_allowed_hosts="hooks.example.com", webhook_secrets_file=tmp_path / "missing"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await submit(client, files.torchscript, ALLOWED)
    app.state.resources.close()
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "webhooks_unavailable" and "retry-after" in response.headers


async def test_an_allowed_webhook_is_accepted_and_kept_in_the_spec(client, files, settings) -> None:
    response = await submit(client, files.torchscript, ALLOWED)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["notify"] == {"url": ALLOWED}
    # A name under the pinned pattern, on its port.
    assert (await submit(client, files.torchscript, "https://build.ci.example.com:8443/h")).status_code == 202
    tasks = [json.loads(m.read_text())["headers"]["task"] for m in broker_messages(settings)]
    assert tasks == ["compactor.run_job", "compactor.run_job"]


async def test_open_mode_signs_with_the_default_tenants_secret(make_settings, files) -> None:
    settings = make_settings(api_keys="", webhook_allowed_hosts="hooks.example.com", webhook_secrets=f"default:{ALICE_SECRET}")
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await submit(client, files.torchscript, ALLOWED, key=None)
    app.state.resources.close()
    assert response.status_code == 202, response.text


async def test_cancelling_a_queued_job_announces_its_end(client, files, settings) -> None:
    job = (await submit(client, files.torchscript, ALLOWED)).json()
    cancel = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelled"
    tasks = [json.loads(m.read_text())["headers"] for m in broker_messages(settings)]
    assert sorted((t["task"], t["id"]) for t in tasks) == [
        ("compactor.notify_job", f"{job['id']}-notify"),
        ("compactor.run_job", f"{job['id']}-1"),
    ]
    # Cancelling again changes nothing and announces nothing.
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))).status_code == 200
    assert len(broker_messages(settings)) == 2


async def test_cancelling_a_job_without_notify_sends_no_webhook_message(client, files, settings) -> None:
    response = await client.post("/v1/jobs", files={"model": ("m.ts", files.torchscript)}, headers=auth(ALICE))
    job = response.json()
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))).status_code == 202
    assert [json.loads(m.read_text())["headers"]["task"] for m in broker_messages(settings)] == ["compactor.run_job"]


def test_the_webhook_body_is_the_job_document_the_api_returns() -> None:
    # compactor.webhooks builds it without importing the gateway: this keeps the two in step.
    now = utcnow()
    jobs = [
        Job(id="job_a", tenant="alice", model_id="mdl_a", spec={"notify": {"url": ALLOWED}}),
        Job(
            id="job_b",
            tenant="alice",
            status=JobStatus.succeeded,
            stage=Stage.export,
            progress=1.0,
            created_at=now,
            started_at=now + timedelta(seconds=1),
            finished_at=now + timedelta(seconds=9),
            attempts=2,
            spec={"quantize": {"mode": "dynamic"}, "notify": {"url": ALLOWED}},
            model_id="mdl_b",
            dataset_id="dst_b",
            metrics={"compressed": {"top1": 0.91, "latency_ms": float("nan")}, "ratios": {"size": 3.9}},
            artifacts=[Artifact(name="model.ts", size_bytes=10, sha256="ab" * 32), Artifact(name="report.json", size_bytes=2, sha256="cd" * 32)],
            lease_owner="w1",
            idempotency_key="k",
        ),
        Job(
            id="job_c",
            tenant="alice",
            status=JobStatus.failed,
            model_id="mdl_c",
            cancel_requested=True,
            error=JobError(code="invalid_model", message="the archive is not TorchScript"),
        ),
    ]
    for job in jobs:
        api = json.loads(job_response(job).body)
        assert json.loads(payload_for(job)) == api == job_document(job)
        assert list(json.loads(payload_for(job))) == list(JobOut.model_fields)
        assert "tenant" not in payload_for(job).decode() and "lease_owner" not in payload_for(job).decode()
