"""compactor.client against a real gateway: real uvicorn on a free port, a tmp data dir,
the SQLite store and the filesystem broker. There is no worker here: tests play its part
through the store's worker-side methods (claim, heartbeat, put_artifact, finish)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import compactor.client as client_module
from compactor.client import (
    ApiError,
    ChecksumMismatch,
    Client,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFinished,
    NotFound,
    PayloadTooLarge,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from compactor.jobs import Stage
from tests.support.gateway import ALICE, BOB
from tests.support.jobs import REPO_ROOT, free_port
from tests.support.live_server import METRICS, Inputs, Server, drive_to_success, running_server

# -- submission


def test_submit_streams_files_in_chunks_with_progress(server: Server, inputs: Inputs, monkeypatch) -> None:
    # Small chunks make a tiny model take many reads: the body is produced piece by piece.
    monkeypatch.setattr(client_module, "CHUNK_BYTES", 512)
    calls: list[tuple[int, int]] = []
    spec = {"prune": {"granularity": "unstructured", "amount": 0.3}, "quantize": {"mode": "dynamic"}}
    with server.client() as client:
        job = client.submit(inputs.model, dataset=inputs.dataset, spec=spec, on_upload_progress=lambda s, t: calls.append((s, t)))
        assert job["status"] == "queued" and job["progress"] == 0.0 and job["dataset_id"]
        assert job["spec"]["prune"]["amount"] == 0.3 and job["spec"]["prune"]["criterion"] == "magnitude"
        assert client.get(job["id"]) == job
    total = inputs.model.stat().st_size + inputs.dataset.stat().st_size
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) > total // 512  # one call per chunk
    assert [s for s, _ in calls] == sorted(s for s, _ in calls)


def test_submit_spec_as_json_text_or_file_and_idempotency(server: Server, inputs: Inputs, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"quantize": {"mode": "dynamic"}}))
    with server.client() as client:
        from_file = client.submit(inputs.model, spec=spec_file)
        from_path_string = client.submit(inputs.model, spec=str(spec_file))
        from_text = client.submit(inputs.model, spec='{"quantize": {"mode": "dynamic"}}')
        assert from_file["spec"] == from_text["spec"] == from_path_string["spec"]
        assert from_text["spec"]["quantize"]["mode"] == "dynamic"
        first = client.submit(inputs.model, idempotency_key="retry-1")
        again = client.submit(inputs.model, idempotency_key="retry-1")
        assert first["id"] == again["id"]
        # Local mistakes are refused before anything is sent.
        with pytest.raises(FileNotFoundError):
            client.submit(tmp_path / "missing.ts")
        with pytest.raises(ValueError, match="not valid JSON"):
            client.submit(inputs.model, spec="{nope")
        with pytest.raises(ValueError, match="neither a JSON object nor an existing file"):
            client.submit(inputs.model, spec="no-such-spec.json")
        assert len(list(client.list())) == 4


def test_uploads_then_submit_ids(server: Server, inputs: Inputs) -> None:
    with server.client() as client:
        model = client.upload_model(inputs.state_dict)
        dataset = client.upload_dataset(inputs.dataset)
        assert model["format"] == "state_dict" and model["size_bytes"] == inputs.state_dict.stat().st_size
        assert model["sha256"] == hashlib.sha256(inputs.state_dict.read_bytes()).hexdigest()
        assert dataset["num_samples"] == 12
        spec = {"model": {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}}, "quantize": {"mode": "dynamic"}}
        job = client.submit_ids(model["id"], dataset["id"], spec, idempotency_key="k1")
        assert job["model_id"] == model["id"] and job["dataset_id"] == dataset["id"]
        assert client.submit_ids(model["id"], dataset["id"], spec, idempotency_key="k1")["id"] == job["id"]


# -- reading, listing, cancelling, deleting


def test_list_follows_cursors_filters_and_limits(server: Server, inputs: Inputs) -> None:
    with server.client() as client:
        model_id = client.upload_model(inputs.model)["id"]
        ids = [client.submit_ids(model_id)["id"] for _ in range(5)]
        assert [job["id"] for job in client.list(page_size=2)] == ids[::-1]  # three pages, newest first
        assert [job["id"] for job in client.list(limit=3, page_size=2)] == ids[::-1][:3]
        assert list(client.list(limit=0)) == []
        client.cancel(ids[1])
        assert [job["id"] for job in client.list(status="cancelled")] == [ids[1]]
        assert len(list(client.list(status="queued"))) == 4
    with server.client(BOB) as bob:  # another tenant sees nothing, and gets 404 for alice's job
        assert list(bob.list()) == []
        with pytest.raises(NotFound):
            bob.get(ids[0])


def test_cancel_and_delete(server: Server, inputs: Inputs) -> None:
    with server.client() as client:
        job = client.submit(inputs.model)
        assert client.cancel(job["id"])["status"] == "cancelled"
        assert client.cancel(job["id"])["status"] == "cancelled"  # a no-op on a finished job
        running = client.submit(inputs.model)
        server.claim(running["id"])
        requested = client.cancel(running["id"])
        assert requested["status"] == "running" and requested["cancel_requested"] is True
        assert client.delete(job["id"]) is None
        with pytest.raises(NotFound) as info:
            client.get(job["id"])
        assert info.value.status == 404 and info.value.code == "not_found"
        with pytest.raises(NotFound):
            client.delete(job["id"])


# -- waiting and downloading


def test_wait_observes_progress_then_success_and_downloads(server: Server, inputs: Inputs, tmp_path: Path) -> None:
    seen: list[tuple[str, str | None, float]] = []
    observed = threading.Condition()

    def on_progress(job: dict[str, Any]) -> None:
        with observed:
            seen.append((job["status"], job["stage"], job["progress"]))
            observed.notify_all()

    def until_seen(predicate: Callable[[tuple[str, str | None, float]], bool]) -> None:
        with observed:
            assert observed.wait_for(lambda: any(predicate(s) for s in seen), timeout=20)

    with server.client() as client:
        job_id = client.submit(inputs.model, dataset=inputs.dataset)["id"]

        def worker() -> None:
            # Advance only once the client has seen each state, so no poll can miss one.
            until_seen(lambda s: s[0] == "queued")
            server.claim(job_id)
            until_seen(lambda s: s[0] == "running")
            server.progress(job_id, Stage.prune, 0.4)
            until_seen(lambda s: s[1] == "prune")
            server.progress(job_id, Stage.quantize, 0.8)
            until_seen(lambda s: s[1] == "quantize")
            contents.update(server.succeed(job_id, tmp_path))

        contents: dict[str, bytes] = {}
        thread = threading.Thread(target=worker)
        thread.start()
        done = client.wait(job_id, poll_interval=0.02, timeout=30, on_progress=on_progress, raise_on_failure=True)
        thread.join()
        assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["metrics"] == METRICS
        assert seen[0][0] == "queued" and seen[-1][0] == "succeeded" and seen[-1][2] == 1.0
        assert ("running", "prune", 0.4) in seen and ("running", "quantize", 0.8) in seen
        progress = [s[2] for s in seen]
        assert progress == sorted(progress) and len(seen) == len(set(seen))  # called on changes only

        one = client.download(job_id, "model.ts", tmp_path / "out" / "compressed.ts")
        assert one == tmp_path / "out" / "compressed.ts" and one.read_bytes() == contents["model.ts"]
        into_dir = client.download(job_id, "report.json", tmp_path / "out")
        assert into_dir == tmp_path / "out" / "report.json" and json.loads(into_dir.read_text()) == METRICS
        every = client.download_all(job_id, tmp_path / "all")
        assert sorted(p.name for p in every) == ["model.ts", "report.json"]
        for path in every:
            assert path.read_bytes() == contents[path.name]
        assert not list((tmp_path / "all").glob("*.part"))
        with pytest.raises(NotFound):
            client.download(job_id, "model.pt", tmp_path / "out")


def test_download_refuses_a_corrupted_artifact(server: Server, inputs: Inputs, tmp_path: Path) -> None:
    with server.client() as client:
        job_id = client.submit(inputs.model)["id"]
        with pytest.raises(JobNotFinished) as early:
            client.download(job_id, "model.ts", tmp_path)
        assert early.value.status == 409 and early.value.code == "job_not_finished"
        with pytest.raises(JobNotFinished):
            client.download_all(job_id, tmp_path / "all")
        drive_to_success(server, job_id, tmp_path)
        on_disk = server.storage.artifact_path(job_id, "model.ts")
        data = bytearray(on_disk.read_bytes())
        data[10] ^= 0xFF  # same length, different bytes: only the hash can tell
        on_disk.write_bytes(bytes(data))
        out = tmp_path / "dl"
        out.mkdir()
        with pytest.raises(ChecksumMismatch) as info:
            client.download(job_id, "model.ts", out)
        assert info.value.expected == hashlib.sha256(b"compressed model " * 300).hexdigest()
        assert info.value.actual == hashlib.sha256(bytes(data)).hexdigest()
        assert list(out.iterdir()) == []  # neither the file nor its temporary is left behind


def test_wait_raises_on_failure_cancel_and_timeout(server: Server, inputs: Inputs) -> None:
    with server.client() as client:
        failing = client.submit(inputs.model)["id"]
        server.claim(failing)
        server.fail(failing)
        assert client.wait(failing, poll_interval=0.01)["status"] == "failed"
        with pytest.raises(JobFailed) as info:
            client.wait(failing, poll_interval=0.01, raise_on_failure=True)
        assert info.value.error == {"code": "invalid_model", "message": "the model could not be loaded"}
        assert not isinstance(info.value, JobCancelled)
        cancelled = client.submit(inputs.model)["id"]
        client.cancel(cancelled)
        with pytest.raises(JobCancelled):
            client.wait(cancelled, poll_interval=0.01, raise_on_failure=True)
        queued = client.submit(inputs.model)["id"]
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as timeout:
            client.wait(queued, poll_interval=0.05, timeout=0.3)
        assert timeout.value.job["status"] == "queued" and time.monotonic() - started < 5


# -- errors


def test_problem_json_maps_to_exceptions(server: Server, inputs: Inputs) -> None:
    with server.client() as client:
        with pytest.raises(NotFound) as missing:
            client.get("job_doesnotexist")
        error = missing.value
        assert (error.status, error.code, error.title) == (404, "not_found", "Not Found")
        assert error.detail and error.problem["instance"] == "/v1/jobs/job_doesnotexist"
        with pytest.raises(InvalidRequest) as invalid:
            client.submit(inputs.model, spec={"prune": {"amount": 1.5, "colour": "red"}})
        assert invalid.value.status == 422 and invalid.value.code == "invalid_spec"
        locs = {tuple(item["loc"]) for item in invalid.value.errors}
        assert ("spec", "prune", "amount") in locs and ("spec", "prune", "colour") in locs
        with pytest.raises(InvalidRequest) as unsafe:
            client.submit(inputs.unsafe)
        assert unsafe.value.code == "unsafe_model"
        with pytest.raises(InvalidRequest) as bad_status:
            list(client.list(status="sleeping"))
        assert bad_status.value.errors
        assert isinstance(invalid.value, ApiError)
    for key in ("wrong-key-0123456789", None):
        with server.client(key) as stranger, pytest.raises(Unauthorized) as denied:
            stranger.get("job_whatever")
        assert denied.value.status == 401 and denied.value.code == "unauthorized"


def test_uploads_past_the_limit_are_payload_too_large(make_settings, inputs: Inputs, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    with running_server(make_settings(max_upload_bytes=1000)) as small, small.client() as client:
        # Past the whole request budget: refused from Content-Length before the body is read.
        with pytest.raises(PayloadTooLarge) as early:
            client.submit(big)
        assert early.value.status == 413 and early.value.code == "payload_too_large"
        # Within the request budget but past the file limit: refused while streaming.
        with pytest.raises(PayloadTooLarge):
            client.upload_model(inputs.model)
        assert list(client.list()) == []


def test_connection_refused_is_a_transport_error(inputs: Inputs, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, "key", timeout=5) as client:
        with pytest.raises(TransportError, match="cannot reach"):
            client.get("job_x")
        with pytest.raises(TransportError):
            client.submit(inputs.model)
        with pytest.raises(TransportError):
            client.download("job_x", "model.ts", tmp_path)
        with pytest.raises(TransportError):
            client.wait("job_x", poll_interval=0.01, max_transient_errors=2)


def test_defaults_come_from_the_environment(server: Server, inputs: Inputs, monkeypatch) -> None:
    monkeypatch.setenv("COMPACTOR_URL", server.url)
    monkeypatch.setenv("COMPACTOR_API_KEY", ALICE)
    with Client() as client:
        assert client.url == server.url
        job = client.submit(inputs.model)
    with server.client() as alice:
        assert alice.get(job["id"])["id"] == job["id"]
    monkeypatch.delenv("COMPACTOR_URL")
    assert Client().url == "http://127.0.0.1:8000"


# What `pip install 'compactor[service]'` adds and the client must do without.
SERVICE_ONLY = [
    "torch",
    "torchvision",
    "torch_pruning",
    "safetensors",
    "numpy",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "multipart",
    "python_multipart",
    "celery",
    "kombu",
    "redis",
    "prometheus_client",
    "service",
    "worker",
]


def test_the_client_needs_httpx_alone() -> None:
    """`pip install compactor` installs httpx only; the SDK and the client commands work with it."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert [requirement.split(">")[0] for requirement in pyproject["project"]["dependencies"]] == ["httpx"]
    code = (
        "import sys\n"
        f"BLOCKED = {SERVICE_ONLY!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not installed with the client')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import compactor.client, compactor.client_cli, launcher.cli\n"
        "launcher.cli.build_parser().parse_args(['status', 'job_x'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
