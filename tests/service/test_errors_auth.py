"""Auth, problem+json for routing errors, open mode, OpenAPI."""

from __future__ import annotations

import pytest

from service.auth import KeyRing, check_bind_allowed
from tests.support.gateway import ALICE, auth

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-000000"}, {"Authorization": f"Basic {ALICE}"}])
async def test_missing_or_wrong_key_is_401(client, headers) -> None:
    response = await client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unauthorized"


async def test_health_needs_no_key(client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "checks": None, "queue_depth": None}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok", "broker": "ok", "storage": "ok"} and ready.json()["queue_depth"] == 0


async def test_routing_errors_are_problems(client) -> None:
    unknown = await client.get("/v1/nothing", headers=auth(ALICE))
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    assert unknown.json()["instance"] == "/v1/nothing"
    wrong_method = await client.put("/v1/jobs", headers=auth(ALICE))
    assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"
    assert set(wrong_method.headers["allow"].split(", ")) == {"GET", "POST"}
    not_media = await client.post("/v1/jobs", content=b"model", headers={**auth(ALICE), "content-type": "text/plain"})
    assert not_media.status_code == 415 and not_media.json()["code"] == "unsupported_media_type"
    bad_id = await client.get("/v1/jobs/..%2F..%2Fetc", headers=auth(ALICE))
    assert bad_id.status_code == 404


async def test_open_mode_is_single_tenant(make_settings) -> None:
    import httpx

    from service.app import create_app

    app = create_app(make_settings(api_keys=""))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/v1/jobs")
    assert response.status_code == 200
    app.state.resources.close()


def test_keyring_hashes_and_bind_rules(make_settings, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# tenants\ncarol:carol-key-123456\n\n", encoding="utf-8")
    ring = KeyRing.from_settings(make_settings(api_keys_file=keys))
    assert ring.tenant_for(ALICE) == "alice" and ring.tenant_for("carol-key-123456") == "carol"
    assert ring.tenant_for("nope") is None and ring.tenant_for("") is None and ring.tenant_for(None) is None
    assert ALICE.encode() not in repr(ring.__dict__).encode()  # only hashes are kept
    with pytest.raises(ValueError):
        KeyRing.from_settings(make_settings(api_keys="no-colon-here"))
    check_bind_allowed(make_settings(api_keys="", host="127.0.0.1"))
    check_bind_allowed(make_settings(api_keys="", host="0.0.0.0", insecure=True))
    check_bind_allowed(make_settings(host="0.0.0.0"))  # keys configured
    with pytest.raises(RuntimeError):
        check_bind_allowed(make_settings(api_keys="", host="0.0.0.0"))


async def test_openapi_describes_bodies_and_problems(client) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/jobs/{job_id}/artifacts/{name}", "get"),
        ("/v1/models", "post"),
        ("/v1/datasets", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    }
    assert expected <= {(p, m) for p, ops in paths.items() for m in ops}
    submit = paths["/v1/jobs"]["post"]
    content = submit["requestBody"]["content"]
    assert set(content["multipart/form-data"]["schema"]["properties"]) == {"model", "dataset", "spec"}
    assert content["application/json"]["schema"]["$ref"] == "#/components/schemas/JobRequest"
    schemas = spec["components"]["schemas"]
    assert {"JobRequest", "Problem", "JobOut", "ModelOut", "DatasetOut", "JobList"} <= set(schemas)
    assert "model_id" in schemas["JobRequest"]["properties"] and "prune" in schemas["JobRequest"]["properties"]
    assert submit["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    assert submit["responses"]["422"]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    assert "file" in paths["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    # every $ref resolves
    import json
    import re

    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec))):
        assert ref in schemas, ref
    assert (await client.get("/docs")).status_code == 200
