"""The gateway's fast paths: resources opened at start-up, the status poll, batched body reads."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import numpy as np
import pytest

from compactor.storage import PayloadTooLarge
from service.app import create_app
from service.uploads import body_chunks_from_thread
from tests.support.gateway import ALICE, auth, stored_files

pytestmark = pytest.mark.anyio


async def test_lifespan_opens_resources_and_closes_them(app) -> None:
    resources = app.state.resources
    assert resources.opened_store is None and resources.opened_storage is None and resources.opened_queue is None
    async with app.router.lifespan_context(app):
        assert resources.opened_store is not None
        assert resources.opened_storage is not None
        assert resources.opened_queue is not None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            missing = await c.get("/v1/jobs/job_nope", headers=auth(ALICE))
            listed = await c.get("/v1/jobs", headers=auth(ALICE))
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        assert listed.status_code == 200 and listed.json() == {"items": [], "next_cursor": None}
    assert resources.opened_store is None


async def test_start_up_survives_a_store_that_cannot_open(make_settings, tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    app = create_app(make_settings(store_url=f"sqlite:///{blocker / 'jobs.sqlite3'}"))
    async with app.router.lifespan_context(app):
        assert app.state.resources.opened_store is None  # left to open on first use
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            response = await c.get("/v1/jobs/job_x", headers=auth(ALICE))
        assert response.status_code == 503 and response.json()["code"] == "store_unavailable"


async def test_status_poll_answers_the_job_document(client, files) -> None:
    model = (await client.post("/v1/models", files={"file": ("m", files.torchscript)}, headers=auth(ALICE))).json()
    job = (await client.post("/v1/jobs", json={"model_id": model["id"]}, headers=auth(ALICE))).json()
    response = await client.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == job


class _FakeRequest:
    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces

    async def stream(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            await anyio.lowlevel.checkpoint()
            yield piece
        yield b""


async def test_body_is_handed_over_in_batches_without_joining_pieces() -> None:
    pieces = [bytes([i % 251]) * size for i, size in enumerate([1, 7, 4093, 70_000, 0, 3, 65_536, 100_000, 5])]

    def consume() -> list[bytes]:
        return list(body_chunks_from_thread(_FakeRequest(pieces), budget=10**9, batch_bytes=64 * 1024))  # type: ignore[arg-type]

    received = await anyio.to_thread.run_sync(consume)
    assert received == [piece for piece in pieces if piece]


async def test_body_past_the_budget_is_too_large() -> None:
    pieces = [b"x" * 1000] * 20

    def consume() -> int:
        total = 0
        for chunk in body_chunks_from_thread(_FakeRequest(pieces), budget=5000, batch_bytes=1 << 20):  # type: ignore[arg-type]
            total += len(chunk)
        return total

    with pytest.raises(PayloadTooLarge):
        await anyio.to_thread.run_sync(consume)


async def test_big_upload_in_odd_pieces_is_stored_intact(app, settings) -> None:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, inputs=rng.random((700, 1024), dtype=np.float32), targets=rng.integers(0, 10, 700))
    data = buffer.getvalue()  # about 2.7 MiB: several batches
    boundary = "b0undary-split-across-pieces"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n\r\n'.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    sizes = [1, 13, 4099, 65_537, 262_144, 3, 131_071]

    async def pieces() -> AsyncIterator[bytes]:
        offset, index = 0, 0
        while offset < len(body):
            size = sizes[index % len(sizes)]
            yield body[offset : offset + size]
            offset += size
            index += 1

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(
            "/v1/datasets",
            content=pieces(),
            headers={**auth(ALICE), "content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["size_bytes"] == len(data)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    assert answer["num_samples"] == 700
    stored = settings.resolved_data_dir / "uploads" / answer["id"]
    assert stored.read_bytes() == data
    assert [p for p in stored_files(settings) if p.parent.name == "tmp"] == []
    app.state.resources.close()
