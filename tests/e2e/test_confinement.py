"""The attacks of an uploaded TorchScript program, through ``POST /v1/jobs`` on a real ``compactor serve``.

Each hostile program is refused at submission (``422 unsafe_model`` naming the op); afterwards the
secrets appear in no stored file, the victim is byte-for-byte unchanged and no file was created. A
legitimate scripted model with control flow still goes through to success on the same tree. The
worker-side layers (the graph check in the child, and the confinement alone with the allowlist
out of the way) are in tests/worker/test_sandbox.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.e2e.test_serve import Serve
from tests.support import hostile_models
from tests.support.jobs import QUICK_SPEC, wait_for

SECRET = b"tenant-b-secret-5d1e0c77\n"


class Gated(nn.Module):
    """A custom architecture with data-dependent control flow (scripted, not traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if bool(y.mean() > 10.0):
            y = y * 0.5
        for _ in range(2):
            y = y + 0.0
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    root = tmp_path_factory.mktemp("confinement")
    tree = Serve(root / "data", root / "serve.log")
    yield tree
    tree.proc.terminate()


def _scripted_bytes(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _submit(serve: Serve, model: bytes, spec: dict | None = None):
    return serve.client.post("/v1/jobs", files={"model": ("model.ts", model), "spec": (None, json.dumps(spec or QUICK_SPEC))})


def _finished(serve: Serve, job_id: str) -> dict:
    def finished() -> dict | None:
        job = serve.client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, 180, f"job {job_id} to finish", interval=0.2)


def test_hostile_programs_are_refused_at_submission_and_touch_nothing(serve: Serve, tmp_path: Path) -> None:
    targets = hostile_models.attack_targets(tmp_path / "outside", SECRET)
    victim_bytes = targets["victim"].read_bytes()
    # Another tenant's upload inside the data directory.
    other = serve.client.post("/v1/models", files={"file": ("m.ts", _scripted_bytes(torch.jit.script(Gated().eval())))})
    assert other.status_code == 201, other.text
    other_path = Path(serve.proc.log_path).parent / "data" / "uploads" / other.json()["id"]
    assert other_path.exists()
    attacks = hostile_models.attacks(targets, len(SECRET), other_path)
    for what, program in attacks.items():
        response = _submit(serve, _scripted_bytes(program))
        assert response.status_code == 422, (what, response.text)
        problem = response.json()
        assert response.headers["content-type"].startswith("application/problem+json")
        assert problem["code"] == "unsafe_model" and "aten::from_file" in problem["detail"], (what, problem)
        also = serve.client.post("/v1/models", files={"file": ("m.ts", _scripted_bytes(program))})
        assert also.status_code == 422 and also.json()["code"] == "unsafe_model", what

    assert targets["victim"].read_bytes() == victim_bytes
    assert not targets["new"].exists()
    data_dir = Path(serve.proc.log_path).parent / "data"
    for stored in data_dir.rglob("*"):
        if stored.is_file() and stored.suffix not in (".sqlite3", ".sqlite3-wal", ".sqlite3-shm"):
            assert SECRET not in stored.read_bytes(), stored
    # Nothing refused was kept: only the one legitimate upload is stored.
    assert sorted(p.name for p in (data_dir / "uploads").iterdir()) == [other.json()["id"]]


def test_a_scripted_custom_model_with_control_flow_still_compresses(serve: Serve) -> None:
    response = _submit(serve, _scripted_bytes(torch.jit.script(Gated().eval())))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def finished() -> dict | None:
        job = serve.client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, 120, f"job {job_id} to finish", interval=0.2)
    assert job["status"] == "succeeded", job
    assert {artifact["name"] for artifact in job["artifacts"]} >= {"model.ts", "report.json"}


def test_a_torchscript_upload_loses_channels_as_a_graph_converted_in_the_confined_child(serve: Serve) -> None:
    """Traced and scripted custom residual networks: converted to checked ATen graphs inside the
    job's confined child, then channel-pruned; a program the converter cannot express fails
    unsupported_combination naming the construct."""
    from tests.support.architectures import DataDependentLoop, build_custom

    channels = {"model": {"input_shape": [1, 1, 8, 8]}, "prune": {"granularity": "channel", "amount": 0.5}}
    model = build_custom("residual_add")
    uploads = {
        "traced": _scripted_bytes(torch.jit.trace(model, torch.randn(2, 1, 8, 8))),
        "scripted": _scripted_bytes(torch.jit.script(model)),
        "loop": _scripted_bytes(torch.jit.script(DataDependentLoop().eval())),
    }
    submitted = {}
    for name, upload in uploads.items():
        response = _submit(serve, upload, channels)
        assert response.status_code == 202, response.text  # the gateway cannot know; the worker converts
        submitted[name] = response.json()["id"]
    for name in ("traced", "scripted"):
        job = _finished(serve, submitted[name])
        assert job["status"] == "succeeded", job
        report = serve.client.get(f"/v1/jobs/{submitted[name]}/artifacts/report.json").json()
        assert report["environment"]["structure"]["converted_from"] == "torchscript"
        assert report["ratios"]["macs"] < 0.45 and report["ratios"]["params"] < 0.45
    failed = _finished(serve, submitted["loop"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "unsupported_combination", failed
    assert "prim::Loop" in failed["error"]["message"] and "unstructured" in failed["error"]["message"]
