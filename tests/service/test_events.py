"""``GET /v1/jobs/{id}/events`` against a real uvicorn server.

The job's state changes are written to the job store exactly as a worker writes
them (claim → heartbeats with stage and progress → finish) by a thread of the
test, so the stream's timing is under the test's control.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from compactor.jobs import JobStatus, Stage
from service.app import create_app
from tests.support.gateway import ALICE, BOB, auth, uvicorn_in_thread


@dataclass
class Event:
    id: str | None
    event: str
    data: dict


@pytest.fixture()
def live(make_settings) -> Iterator[tuple[httpx.Client, object]]:
    app = create_app(make_settings(events_poll_seconds=0.05))
    with uvicorn_in_thread(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        yield client, app


def _events(lines: Iterator[str]) -> Iterator[Event]:
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def _submit(client: httpx.Client, files) -> str:
    response = client.post("/v1/jobs", files={"model": ("m", files.torchscript)}, headers=auth(ALICE))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _work(store, job_id: str, steps: list[tuple[Stage, float]], pause: float) -> None:
    """What a worker writes, in order: claim, one heartbeat per step, success."""
    owner = "test-worker/1"
    assert store.claim(job_id, owner, 30) is not None
    for stage, progress in steps:
        time.sleep(pause)
        assert store.heartbeat(job_id, owner, 30, stage=stage, progress=progress) is not None
    time.sleep(pause)
    assert store.finish(job_id, owner, JobStatus.succeeded, metrics={"ratios": {"size": 0.5}}, artifacts=[]) is not None


def test_stream_follows_the_job_to_its_end(live, files) -> None:
    client, app = live
    job_id = _submit(client, files)
    store = app.state.resources.store
    steps = [(Stage.load, 0.1), (Stage.finetune, 0.4), (Stage.finetune, 0.4), (Stage.export, 0.9)]
    worker = threading.Thread(target=_work, args=(store, job_id, steps, 0.3))
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(ALICE)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        worker.start()
        received = list(_events(response.iter_lines()))
    worker.join()

    assert all(event.event == "job" for event in received)
    assert received[0].data["status"] == "queued"
    assert received[-1].data["status"] == "succeeded" and received[-1].data["progress"] == 1.0
    assert received[-1].data["metrics"] == {"ratios": {"size": 0.5}}
    seen = [(e.data["status"], e.data["stage"], e.data["progress"]) for e in received]
    # Every distinct state the worker wrote, in order, each once (the repeated heartbeat is not news).
    for state in [("running", "load", 0.1), ("running", "finetune", 0.4), ("running", "export", 0.9)]:
        assert seen.count(state) == 1, seen
    progress = [e.data["progress"] for e in received]
    assert progress == sorted(progress)
    assert len({e.id for e in received}) == len(received)
    # The document is the one GET /v1/jobs/{id} answers.
    assert received[-1].data == client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()


def test_last_event_id_resumes_without_repeating(live, files) -> None:
    client, app = live
    job_id = _submit(client, files)
    url = f"/v1/jobs/{job_id}/events"
    with client.stream("GET", url, headers=auth(ALICE)) as response:
        first = next(_events(response.iter_lines()))
    assert first.data["status"] == "queued" and first.id

    store = app.state.resources.store
    worker = threading.Thread(target=_work, args=(store, job_id, [(Stage.load, 0.5)], 0.3))
    with client.stream("GET", url, headers={**auth(ALICE), "Last-Event-ID": first.id}) as response:
        worker.start()
        resumed = list(_events(response.iter_lines()))
    worker.join()
    assert resumed, "the stream must go on after the last state the client had"
    assert resumed[0].id != first.id and resumed[0].data["status"] == "running"
    assert resumed[-1].data["status"] == "succeeded"

    # The final state again: nothing left to say, and 204 tells the client not to reconnect.
    done = client.get(url, headers={**auth(ALICE), "Last-Event-ID": resumed[-1].id})
    assert done.status_code == 204 and done.content == b""
    # A finished job without Last-Event-ID: its final state, then the stream ends.
    with client.stream("GET", url, headers=auth(ALICE)) as response:
        only = list(_events(response.iter_lines()))
    assert [event.data["status"] for event in only] == ["succeeded"] and only[0].id == resumed[-1].id


def test_deleted_job_ends_the_stream(live, files) -> None:
    client, app = live
    job_id = _submit(client, files)
    # Running: a delete flags the cancel and removes the job before any worker could finish it.
    assert app.state.resources.store.claim(job_id, "test-worker/1", 30) is not None

    def delete_soon() -> None:
        time.sleep(0.3)
        assert client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).status_code == 204

    deleter = threading.Thread(target=delete_soon)
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(ALICE)) as response:
        deleter.start()
        received = list(_events(response.iter_lines()))
    deleter.join()
    assert received[0].data["status"] == "running"
    assert received[-1].event == "deleted" and received[-1].data == {"id": job_id}


def test_other_tenants_and_missing_keys_get_no_stream(live, files) -> None:
    client, _app = live
    job_id = _submit(client, files)
    other = client.get(f"/v1/jobs/{job_id}/events", headers=auth(BOB))
    assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401
    assert client.get("/v1/jobs/job_nope/events", headers=auth(ALICE)).status_code == 404
