"""The status poll's fast path answers exactly what the FastAPI route answers, and only 200s."""

from __future__ import annotations

import pytest

from compactor.jobs import JobStatus
from service.app import create_app
from tests.support.gateway import ALICE, BOB, auth

pytestmark = pytest.mark.anyio


async def _submit(client, files, key: str = ALICE) -> str:
    response = await client.post("/v1/jobs", files={"model": ("m", files.torchscript)}, headers=auth(key))
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_success_is_the_route_s_document_byte_for_byte(client, files, app) -> None:
    job_id = await _submit(client, files)
    store = app.state.resources.store
    store.claim(job_id, "w@h/1/t/n", 30)
    store.heartbeat(job_id, "w@h/1/t/n", 30, stage=None, progress=0.25)
    fast = await client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE))
    assert fast.status_code == 200 and fast.headers["content-type"] == "application/json"
    assert int(fast.headers["content-length"]) == len(fast.content)
    # The same job through FastAPI's own serialization (the list route, and the cancel route's JobOut).
    listed = (await client.get("/v1/jobs", headers=auth(ALICE))).json()["items"]
    assert [item for item in listed if item["id"] == job_id] == [fast.json()]
    cancelled = await client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(ALICE))
    again = await client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE))
    assert again.json() == cancelled.json() and again.json()["cancel_requested"] is True


@pytest.mark.parametrize(
    ("headers", "path", "status", "code"),
    [
        ({}, "{job}", 401, "unauthorized"),
        ({"Authorization": "Bearer not-a-key-at-all"}, "{job}", 401, "unauthorized"),
        ({"Authorization": "Basic " + ALICE}, "{job}", 401, "unauthorized"),
        (auth(BOB), "{job}", 404, "not_found"),
        (auth(ALICE), "job_doesnotexist", 404, "not_found"),
        (auth(ALICE), "bad%20id", 404, "not_found"),
    ],
)
async def test_every_other_answer_is_the_full_application_s(client, files, headers, path, status, code) -> None:
    job_id = await _submit(client, files)
    response = await client.get(f"/v1/jobs/{path.format(job=job_id)}", headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_store_that_is_down_is_a_503_from_the_full_application(make_settings) -> None:
    import httpx

    app = create_app(make_settings(store_url="redis://127.0.0.1:1/0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.get("/v1/jobs/job_abc", headers=auth(ALICE))
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    assert "retry-after" in response.headers
    app.state.resources.close()


async def test_open_mode_serves_the_default_tenant(make_settings, files) -> None:
    import httpx

    app = create_app(make_settings(api_keys=""))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        job_id = await _submit(client, files, key="ignored-in-open-mode")
        response = await client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["status"] == JobStatus.queued.value
    app.state.resources.close()
