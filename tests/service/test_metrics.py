"""``GET /metrics``: Prometheus text with the gateway's own series and the job store's gauges."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compactor.jobs import JobStatus
from service.app import create_app
from tests.support.gateway import ALICE, BOB, auth

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_jobs_by_status_queue_depth_and_running_per_worker(client, files, app) -> None:
    ids = []
    for key in (ALICE, ALICE, BOB):
        response = await client.post("/v1/jobs", files={"model": ("m", files.torchscript)}, headers=auth(key))
        assert response.status_code == 202
        ids.append(response.json()["id"])
    store = app.state.resources.store
    assert store.claim(ids[0], "worker1@host-a/4242/task-1/ab12", 30) is not None
    assert (await client.post(f"/v1/jobs/{ids[1]}/cancel", headers=auth(ALICE))).status_code == 202

    scraped = await scrape(client)
    assert value(scraped, "compactor_store_up") == 1
    # Across tenants: the operator's view.
    assert value(scraped, "compactor_jobs", status="queued") == 1
    assert value(scraped, "compactor_jobs", status="running") == 1
    assert value(scraped, "compactor_jobs", status="cancelled") == 1
    assert value(scraped, "compactor_jobs", status="succeeded") == 0
    assert value(scraped, "compactor_queue_depth") == 1
    assert value(scraped, "compactor_running_jobs", worker="worker1@host-a") == 1
    # The broker holds the messages of all three submissions (the cancelled one is revoked, not removed).
    assert value(scraped, "compactor_broker_messages") >= 1

    store.finish(ids[0], "worker1@host-a/4242/task-1/ab12", JobStatus.succeeded)
    scraped = await scrape(client)
    assert value(scraped, "compactor_jobs", status="succeeded") == 1
    assert ("compactor_running_jobs", (("worker", "worker1@host-a"),)) not in scraped


async def test_request_latency_by_route_template_and_upload_bytes(client, files) -> None:
    before = await scrape(client)
    response = await client.post("/v1/models", files={"file": ("m", files.torchscript)}, headers=auth(ALICE))
    assert response.status_code == 201
    job_ids = ["job_nope1", "job_nope2", "job_nope3"]
    for job_id in job_ids:
        assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE))).status_code == 404
    assert (await client.get("/no/such/path/123")).status_code == 404
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # One series per route template, not per job id.
    assert grew("compactor_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}") == 3
    assert grew("compactor_http_responses_total", method="GET", route="/v1/jobs/{job_id}", status="404") == 3
    assert not any("job_nope" in str(labels) for _, labels in after)
    assert grew("compactor_http_responses_total", method="GET", route="unmatched", status="404") == 1
    assert grew("compactor_http_responses_total", method="POST", route="/v1/models", status="201") == 1
    assert grew("compactor_upload_bytes_total", kind="model") == len(files.torchscript)
    assert grew("compactor_uploads_total", kind="model") == 1


async def test_a_metrics_token_guards_the_endpoint(make_settings) -> None:
    import httpx

    app = create_app(make_settings(metrics_token="scrape-secret"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        refused = await client.get("/metrics")
        assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
        assert (await client.get("/metrics", headers=auth(ALICE))).status_code == 401
        allowed = await client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert allowed.status_code == 200 and "compactor_jobs" in allowed.text
    app.state.resources.close()


async def test_a_store_that_is_down_is_reported_not_a_failed_scrape(make_settings, tmp_path) -> None:
    import httpx

    app = create_app(make_settings(store_url="redis://127.0.0.1:1/0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert value(samples(response.text), "compactor_store_up") == 0
    app.state.resources.close()
