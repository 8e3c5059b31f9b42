"""POST /v1/models and /v1/datasets: formats from content, hashes, limits, nothing left behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import httpx
import pytest
import torch

from tests.support.gateway import ALICE, BOB, auth, stored_files

pytestmark = pytest.mark.anyio


async def upload(client: httpx.AsyncClient, kind: str, data: bytes, key: str = ALICE, name: str = "f.bin") -> httpx.Response:
    return await client.post(f"/v1/{kind}", files={"file": (name, data)}, headers=auth(key))


@pytest.mark.parametrize(("which", "fmt"), [("torchscript", "torchscript"), ("state_dict", "state_dict"), ("pt2", "pt2")])
async def test_upload_model_detects_format_and_hashes(client, files, settings, which, fmt) -> None:
    data = getattr(files, which)
    response = await upload(client, "models", data, name="../../etc/passwd")  # the name is never a path
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "format", "size_bytes", "sha256"}
    assert body["format"] == fmt
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    stored = settings.resolved_data_dir / "uploads" / body["id"]
    assert stored.read_bytes() == data
    got = await client.get(f"/v1/models/{body['id']}", headers=auth(ALICE))
    assert got.status_code == 200 and got.json() == body
    assert (await client.get(f"/v1/models/{body['id']}", headers=auth(BOB))).status_code == 404


@pytest.mark.parametrize(("which", "fmt", "samples"), [("dataset_pt", "pt", 12), ("dataset_npz", "npz", 12), ("dataset_npz_unlabeled", "npz", 7)])
async def test_upload_dataset_counts_samples(client, files, which, fmt, samples) -> None:
    data = getattr(files, which)
    response = await upload(client, "datasets", data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == fmt and body["num_samples"] == samples
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size_bytes"] == len(data)


async def test_unsafe_model_is_refused_and_not_kept(client, files, settings) -> None:
    response = await upload(client, "models", files.unsafe)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "unsafe_model"
    assert "TorchScript" in problem["detail"]
    assert stored_files(settings) == []


async def test_a_pt2_that_would_unpickle_code_is_refused_at_upload(client, files, settings, tmp_path) -> None:
    # torch.export.load would run this (its sample inputs fall back to weights_only=False).
    class Touch:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil_inputs = io.BytesIO()
    torch.save(((Touch(),), {}), evil_inputs)
    source, evil = zipfile.ZipFile(io.BytesIO(files.pt2)), io.BytesIO()
    with zipfile.ZipFile(evil, "w") as target:
        for info in source.infolist():
            is_inputs = info.filename.endswith("data/sample_inputs/model.pt")
            target.writestr(info, evil_inputs.getvalue() if is_inputs else source.read(info))
    response = await upload(client, "models", evil.getvalue())
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "unsafe_model" and "posix.system" in response.json()["detail"]
    assert stored_files(settings) == [] and not (tmp_path / "pwned").exists()


async def test_unknown_model_format_is_415(client, files, settings) -> None:
    response = await upload(client, "models", files.not_a_model)
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_model_format"
    assert stored_files(settings) == []


async def test_model_file_as_dataset_is_invalid_dataset(client, files, settings) -> None:
    response = await upload(client, "datasets", files.torchscript)
    assert response.status_code == 422 and response.json()["code"] == "invalid_dataset"
    assert stored_files(settings) == []


async def test_missing_and_unexpected_parts(client, files, settings) -> None:
    missing = await client.post("/v1/models", files={"other": ("x", b"123")}, headers=auth(ALICE))
    assert missing.status_code == 422 and missing.json()["code"] == "invalid_request"
    assert missing.json()["errors"][0]["loc"] == ["body", "other"]
    empty_form = await client.post("/v1/models", headers={**auth(ALICE), "content-type": "multipart/form-data; boundary=abc"}, content=b"--abc--\r\n")
    assert empty_form.status_code == 422 and empty_form.json()["errors"][0]["loc"] == ["body", "file"]
    assert stored_files(settings) == []


async def test_non_multipart_upload_is_415(client) -> None:
    response = await client.post("/v1/models", content=json.dumps({"a": 1}), headers={**auth(ALICE), "content-type": "application/json"})
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


@pytest.fixture()
def small_settings(make_settings):
    return make_settings(max_upload_bytes=4096)


@pytest.fixture()
def small_app(small_settings):
    from service.app import create_app

    return create_app(small_settings)


async def test_payload_too_large_by_content_length(small_app, small_settings, files) -> None:
    big = files.torchscript + b"\0" * (200 * 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app), base_url="http://t") as c:
        response = await c.post("/v1/models", files={"file": ("m", big)}, headers=auth(ALICE))
        job = await c.post("/v1/jobs", files={"model": ("m", big)}, headers=auth(ALICE))
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert job.status_code == 413 and job.json()["code"] == "payload_too_large"
    assert stored_files(small_settings) == []


async def test_payload_too_large_when_streamed_without_length(small_app, small_settings) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n'.encode()

    async def body():
        yield head
        for _ in range(10):  # 10 KiB of file data, in chunks, with no Content-Length
            yield b"\1" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app), base_url="http://t") as c:
        response = await c.post("/v1/models", content=body(), headers={**auth(ALICE), "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"
    assert stored_files(small_settings) == []


# -- one set of limits: what the gateway accepts, the worker loads (compactor/limits.py)


def _npz(inputs) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, inputs=inputs)
    return buffer.getvalue()


@pytest.mark.parametrize("max_dataset_bytes", [1024])
async def test_a_dataset_past_the_configured_size_is_refused_at_upload(make_settings, max_dataset_bytes) -> None:
    import numpy as np

    from service.app import create_app

    settings = make_settings(max_dataset_bytes=max_dataset_bytes)
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await upload(client, "datasets", _npz(np.zeros((40, 1, 8, 8), dtype=np.float32)))
        # 10 KiB of float32 declared: above 1 KiB, refused before the job is ever queued.
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_dataset" and "uncompressed bytes" in response.json()["detail"]
        small = await upload(client, "datasets", _npz(np.zeros((2, 1, 4, 4), dtype=np.float32)))
        assert small.status_code == 201, small.text
        # uint8 inputs that fit the archive budget but would not fit it as float32.
        wide = await upload(client, "datasets", _npz(np.zeros((8, 1, 8, 8), dtype=np.uint8)))
        assert wide.status_code == 422 and "COMPACTOR_MAX_DATASET_BYTES" in wide.json()["detail"], wide.text
    app.state.resources.close()
    assert stored_files(settings) == [p for p in stored_files(settings) if p.name == small.json()["id"]]


async def test_a_pt2_calling_an_op_off_the_allowlist_is_refused_at_upload(client, files, settings) -> None:
    # The gateway (torch-free) reads the ops from the program's JSON; the worker checks the graph again.
    class Prints(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten._print("a side effect of calling the model")
            return x * 2

    program = io.BytesIO()
    torch.export.save(torch.export.export(Prints(), (torch.randn(2, 4),)), program)
    response = await upload(client, "models", program.getvalue())
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "unsafe_model" and "aten::_print" in response.json()["detail"]
    # A hand-edited program naming a file-reading op is refused the same way, whatever the graph says.
    source, edited = zipfile.ZipFile(io.BytesIO(files.pt2)), io.BytesIO()
    with zipfile.ZipFile(edited, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b"torch.ops.aten.relu.default", b"torch.ops.aten.from_file.default", 1)
            target.writestr(info, data)
    response = await upload(client, "models", edited.getvalue())
    assert response.status_code == 422 and "aten::from_file" in response.json()["detail"]
    assert stored_files(settings) == []
