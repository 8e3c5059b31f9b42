"""One round trip against a real uvicorn server on a free port."""

from __future__ import annotations

import json

import httpx

from service.app import create_app
from tests.support.gateway import ALICE, auth, broker_messages, uvicorn_in_thread


def test_real_uvicorn_server(settings, files) -> None:
    app = create_app(settings)
    with uvicorn_in_thread(app) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            model = client.post("/v1/models", files={"file": ("m", files.torchscript)}, headers=auth(ALICE))
            assert model.status_code == 201, model.text
            spec = {"prune": {"granularity": "unstructured", "amount": 0.2}}
            job = client.post(
                "/v1/jobs",
                files={"model": ("m", files.torchscript), "dataset": ("d", files.dataset_npz), "spec": (None, json.dumps(spec))},
                headers=auth(ALICE),
            )
            assert job.status_code == 202, job.text
            assert client.get(job.headers["location"], headers=auth(ALICE)).json()["status"] == "queued"

            def chunked():
                yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n'
                yield files.torchscript
                yield b"\r\n--xyz--\r\n"

            streamed = client.post("/v1/models", content=chunked(), headers={**auth(ALICE), "content-type": "multipart/form-data; boundary=xyz"})
            assert streamed.status_code == 201 and streamed.json()["size_bytes"] == len(files.torchscript)
            unauthorized = client.get("/v1/jobs")
            assert unauthorized.status_code == 401 and unauthorized.headers["content-type"] == "application/problem+json"
        assert len(broker_messages(settings)) == 1
