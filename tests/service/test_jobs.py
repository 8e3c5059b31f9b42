"""POST/GET/cancel/DELETE /v1/jobs and artifacts, through the real app, store, storage and broker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from compactor.jobs import JobStatus
from compactor.spec import JobSpec
from tests.support.gateway import ALICE, BOB, auth, broker_messages, stored_files

pytestmark = pytest.mark.anyio

JOB_KEYS = {
    "id",
    "status",
    "stage",
    "progress",
    "created_at",
    "started_at",
    "finished_at",
    "attempts",
    "spec",
    "error",
    "metrics",
    "artifacts",
    "cancel_requested",
    "model_id",
    "dataset_id",
}


async def submit(
    client: httpx.AsyncClient,
    model: bytes,
    *,
    spec: dict | None = None,
    dataset: bytes | None = None,
    key: str = ALICE,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    files: dict[str, tuple] = {"model": ("model.bin", model)}
    if dataset is not None:
        files["dataset"] = ("data.bin", dataset)
    if spec is not None:
        files["spec"] = (None, json.dumps(spec), "application/json")
    return await client.post("/v1/jobs", files=files, headers={**auth(key), **(headers or {})})


async def upload(client: httpx.AsyncClient, kind: str, data: bytes, key: str = ALICE) -> str:
    response = await client.post(f"/v1/{kind}", files={"file": ("f", data)}, headers=auth(key))
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def test_submit_multipart_job_is_queued_and_enqueued(client, files, settings) -> None:
    spec = {"prune": {"granularity": "unstructured", "amount": 0.3}, "quantize": {"mode": "dynamic"}}
    response = await submit(client, files.torchscript, spec=spec, dataset=files.dataset_pt)
    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) == JOB_KEYS
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["artifacts"] == []
    assert job["spec"] == JobSpec.model_validate(spec).model_dump(mode="json")  # defaults filled in
    assert job["spec"]["prune"]["criterion"] == "magnitude" and job["spec"]["data"]["val_fraction"] == 0.2
    assert "tenant" not in response.text and str(settings.resolved_data_dir) not in response.text
    # The message is really in the filesystem broker, addressed to the task by name.
    [message] = broker_messages(settings)
    assert message.name.endswith(f".{settings.queue_name}.msg")
    payload = json.loads(message.read_text())
    assert payload["headers"]["task"] == "compactor.run_job"
    assert payload["headers"]["id"] == f"{job['id']}-1"
    assert job["id"] in payload["body"] or job["id"] in json.dumps(payload)
    got = await client.get(response.headers["location"], headers=auth(ALICE))
    assert got.status_code == 200 and got.json() == job


async def test_submit_json_job_with_earlier_uploads(client, files, settings) -> None:
    model_id = await upload(client, "models", files.state_dict)
    dataset_id = await upload(client, "datasets", files.dataset_npz)
    spec = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "model": {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}},
        "prune": {"criterion": "taylor", "granularity": "channel"},
        "finetune": {"epochs": 1},
        "target": {"max_accuracy_drop": 0.02},
    }
    response = await client.post("/v1/jobs", json=spec, headers=auth(ALICE))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["model_id"] == model_id and job["dataset_id"] == dataset_id
    assert "model_id" not in job["spec"] and job["spec"]["target"]["max_trials"] == 6
    assert len(broker_messages(settings)) == 1


async def test_invalid_spec_reports_field_locations_and_keeps_nothing(client, files, settings) -> None:
    response = await submit(client, files.torchscript, spec={"prune": {"amount": 1.5, "colour": "red"}})
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "invalid_spec"
    assert response.headers["content-type"] == "application/problem+json"
    locs = {tuple(e["loc"]) for e in problem["errors"]}
    assert ("spec", "prune", "amount") in locs and ("spec", "prune", "colour") in locs
    assert set(problem) >= {"type", "title", "status", "detail", "instance", "code", "errors"}
    broken = await client.post("/v1/jobs", files={"model": ("m", files.torchscript), "spec": (None, "{not json")}, headers=auth(ALICE))
    assert broken.status_code == 422 and broken.json()["code"] == "invalid_spec"
    assert stored_files(settings) == [] and broker_messages(settings) == []
    assert (await client.get("/v1/jobs", headers=auth(ALICE))).json()["items"] == []


@pytest.mark.parametrize(
    ("model", "spec", "dataset", "code", "field"),
    [
        ("state_dict", {"quantize": {"mode": "dynamic"}}, None, "invalid_spec", "model.arch"),
        ("torchscript", {"prune": {"granularity": "unstructured", "criterion": "gradient"}}, None, "unsupported_combination", "prune.criterion"),
        ("torchscript", {"finetune": {"epochs": 1}}, None, "unsupported_combination", "finetune"),
        (
            "torchscript",
            {"prune": {"granularity": "unstructured"}, "target": {"max_accuracy_drop": 0.01}},
            "dataset_npz_unlabeled",
            "unsupported_combination",
            "target",
        ),
        ("torchscript", {"model": {"format": "state_dict"}}, None, "invalid_spec", "model.format"),
    ],
)
async def test_combinations_the_format_cannot_do_are_refused(client, files, settings, model, spec, dataset, code, field) -> None:
    response = await submit(client, getattr(files, model), spec=spec, dataset=getattr(files, dataset) if dataset else None)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == code and problem["field"] == field
    assert problem["errors"][0]["loc"] == ["spec", *field.split(".")]
    assert stored_files(settings) == [] and broker_messages(settings) == []


async def test_unsafe_model_in_job_submission(client, files, settings) -> None:
    response = await submit(client, files.unsafe, spec={"quantize": {}}, dataset=files.dataset_pt)
    assert response.status_code == 422 and response.json()["code"] == "unsafe_model"
    assert stored_files(settings) == [] and broker_messages(settings) == []


async def test_idempotency_key_returns_the_same_job(client, files, settings) -> None:
    headers = {"Idempotency-Key": "retry-123"}
    first = await submit(client, files.torchscript, headers=headers)
    second = await submit(client, files.torchscript, headers=headers)
    assert first.status_code == 202 and second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    # The job is still queued, so the retry sends its message again: the first request may
    # have died between storing the job and enqueueing it. Both name the same job (claims
    # let one attempt run); no second job exists.
    assert len(broker_messages(settings)) == 2
    assert {m.read_text().count(first.json()["id"]) > 0 for m in broker_messages(settings)} == {True}
    assert len(stored_files(settings)) == 1  # the retry's upload was not kept
    other = await submit(client, files.torchscript, headers={"Idempotency-Key": "retry-456"})
    assert other.json()["id"] != first.json()["id"]
    bob = await submit(client, files.torchscript, key=BOB, headers=headers)  # keys are per tenant
    assert bob.json()["id"] != first.json()["id"]


async def test_list_jobs_paginates_newest_first(client, files) -> None:
    model_id = await upload(client, "models", files.torchscript)
    ids = []
    for _ in range(5):
        response = await client.post("/v1/jobs", json={"model_id": model_id}, headers=auth(ALICE))
        ids.append(response.json()["id"])
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", params=params, headers=auth(ALICE))).json()
        pages += 1
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == ids[::-1]
    await client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(ALICE))
    cancelled = (await client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth(ALICE))).json()
    assert [i["id"] for i in cancelled["items"]] == [ids[0]]
    for bad in ({"limit": 0}, {"limit": 201}, {"status": "sleeping"}, {"cursor": "bm90LWEtY3Vyc29y"}):
        response = await client.get("/v1/jobs", params=bad, headers=auth(ALICE))
        assert response.status_code == 422, bad
        assert response.json()["code"] == "invalid_request" and response.json()["errors"]
    assert (await client.get("/v1/jobs", headers=auth(BOB))).json() == {"items": [], "next_cursor": None}


async def test_cancel_then_delete(client, files, settings, app) -> None:
    job = (await submit(client, files.torchscript)).json()
    cancel = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelled"
    again = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # A queued job that a worker would find: the store refuses to let it run.
    assert app.state.resources.store.claim(job["id"], "worker-1", 30.0) is None
    deleted = await client.delete(f"/v1/jobs/{job['id']}", headers=auth(ALICE))
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE))).status_code == 404
    assert (await client.delete(f"/v1/jobs/{job['id']}", headers=auth(ALICE))).status_code == 404


async def _succeed(app, job_id: str, tmp_path: Path) -> bytes:
    """Run the worker's side of the store contract for real: claim, store an artifact, finish."""
    store, storage = app.state.resources.store, app.state.resources.storage
    assert store.claim(job_id, "worker-1", 30.0) is not None
    content = b"compressed model bytes" * 50
    source = tmp_path / "model.ts"
    source.write_bytes(content)
    artifact = storage.put_artifact(job_id, "model.ts", source)
    assert store.finish(job_id, "worker-1", JobStatus.succeeded, metrics={"ratios": {"size": 0.5}}, artifacts=[artifact])
    return content


async def test_artifact_download_etag_and_errors(client, files, app, tmp_path) -> None:
    job = (await submit(client, files.torchscript)).json()
    url = f"/v1/jobs/{job['id']}/artifacts/model.ts"
    early = await client.get(url, headers=auth(ALICE))
    assert early.status_code == 409 and early.json()["code"] == "job_not_finished"
    content = await _succeed(app, job["id"], tmp_path)
    done = (await client.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE))).json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["artifacts"] == [{"name": "model.ts", "size_bytes": len(content), "sha256": hashlib.sha256(content).hexdigest(), "url": url}]
    response = await client.get(url, headers=auth(ALICE))
    assert response.status_code == 200 and response.content == content
    assert response.headers["content-length"] == str(len(content))
    etag = f'"{hashlib.sha256(content).hexdigest()}"'
    assert response.headers["etag"] == etag
    cached = await client.get(url, headers={**auth(ALICE), "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    stale = await client.get(url, headers={**auth(ALICE), "If-None-Match": '"0000"'})
    assert stale.status_code == 200
    missing = await client.get(f"/v1/jobs/{job['id']}/artifacts/report.json", headers=auth(ALICE))
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    finished_cancel = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE))
    assert finished_cancel.status_code == 200 and finished_cancel.json()["status"] == "succeeded"
    assert (await client.delete(f"/v1/jobs/{job['id']}", headers=auth(ALICE))).status_code == 204
    assert not (app.state.resources.storage.job_dir(job["id"])).exists()


async def test_tenant_isolation_on_every_route(client, files, app, tmp_path) -> None:
    model_id = await upload(client, "models", files.torchscript)
    dataset_id = await upload(client, "datasets", files.dataset_pt)
    job = (await client.post("/v1/jobs", json={"model_id": model_id}, headers=auth(ALICE))).json()
    await _succeed(app, job["id"], tmp_path)
    jid = job["id"]
    bob = auth(BOB)
    checks = [
        await client.get(f"/v1/jobs/{jid}", headers=bob),
        await client.get(f"/v1/jobs/{jid}/artifacts/model.ts", headers=bob),
        await client.post(f"/v1/jobs/{jid}/cancel", headers=bob),
        await client.delete(f"/v1/jobs/{jid}", headers=bob),
        await client.get(f"/v1/models/{model_id}", headers=bob),
        await client.get(f"/v1/datasets/{dataset_id}", headers=bob),
        await client.post("/v1/jobs", json={"model_id": model_id}, headers=bob),
    ]
    for response in checks:
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.json()["code"] == "not_found"
    bob_model = await upload(client, "models", files.torchscript, key=BOB)
    with_alices_data = await client.post("/v1/jobs", json={"model_id": bob_model, "dataset_id": dataset_id}, headers=bob)
    assert with_alices_data.status_code == 404
    # Alice's job is untouched by Bob's attempts.
    assert (await client.get(f"/v1/jobs/{jid}", headers=auth(ALICE))).json()["status"] == "succeeded"


async def test_broker_down_answers_503_and_leaves_no_job(make_settings, files) -> None:
    from service.app import create_app

    settings = make_settings(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await submit(c, files.torchscript)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "broker_unavailable" and response.headers["retry-after"]
        assert (await c.get("/v1/jobs", headers=auth(ALICE))).json()["items"] == []
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
        assert "broker" in ready.json()["detail"] and ready.json()["checks"]["store"] == "ok"
    assert stored_files(settings) == []
    app.state.resources.close()
