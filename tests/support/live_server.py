"""A real gateway (uvicorn on a free port, a tmp data dir, the SQLite store and the filesystem
broker) with no worker: a test plays the worker's part through the store's worker-side methods
(claim, heartbeat, put_artifact, finish)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactor.client import Client
from compactor.jobs import JobError, JobStatus, Stage
from compactor.settings import Settings
from service.app import create_app
from tests.support.gateway import ALICE, Files, uvicorn_in_thread

WORKER = "test-worker"
METRICS: dict[str, Any] = {
    "original": {"accuracy": {"top1": 0.9, "top5": 1.0}, "size_bytes": 2_000_000},
    "compressed": {"accuracy": {"top1": 0.885, "top5": 1.0}, "size_bytes": 500_000},
    "ratios": {"size": 0.25, "params": 0.5, "macs": 0.5, "speedup_batch_1": 1.5, "speedup_batch_32": 2.25},
}


@dataclass
class Server:
    url: str
    app: Any
    settings: Settings

    @property
    def store(self) -> Any:
        return self.app.state.resources.store

    @property
    def storage(self) -> Any:
        return self.app.state.resources.storage

    def client(self, key: str | None = ALICE, **kwargs: Any) -> Client:
        return Client(self.url, key, **kwargs)

    # -- the worker's side of the store contract, for real

    def claim(self, job_id: str) -> None:
        assert self.store.claim(job_id, WORKER, 30.0) is not None

    def progress(self, job_id: str, stage: Stage, progress: float) -> None:
        assert self.store.heartbeat(job_id, WORKER, 30.0, stage=stage, progress=progress) is not None

    def succeed(self, job_id: str, tmp_path: Path, artifacts: dict[str, bytes] | None = None) -> dict[str, bytes]:
        artifacts = artifacts or {"model.ts": b"compressed model " * 300, "report.json": json.dumps(METRICS).encode()}
        stored = []
        for name, content in artifacts.items():
            source = tmp_path / f"src-{job_id}-{name}"
            source.write_bytes(content)
            stored.append(self.storage.put_artifact(job_id, name, source))
        assert self.store.finish(job_id, WORKER, JobStatus.succeeded, metrics=METRICS, artifacts=stored) is not None
        return artifacts

    def fail(self, job_id: str) -> None:
        error = JobError(code="invalid_model", message="the model could not be loaded")
        assert self.store.finish(job_id, WORKER, JobStatus.failed, error=error) is not None

    def queued_job_id(self, timeout: float = 20.0) -> str:
        """The id of the first queued job, once one exists (for submissions made by another thread)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.store.unfinished_jobs() if j.status is JobStatus.queued]
            if jobs:
                return str(jobs[0].id)
            time.sleep(0.02)
        raise AssertionError("no job was submitted")


@contextmanager
def running_server(settings: Settings) -> Iterator[Server]:
    """A real uvicorn server for ``settings`` on a free loopback port, in a thread."""
    app = create_app(settings)
    with uvicorn_in_thread(app) as base:
        yield Server(base, app, settings)


@dataclass
class Inputs:
    model: Path
    dataset: Path
    state_dict: Path
    unsafe: Path


def drive_to_success(server: Server, job_id: str, tmp_path: Path) -> dict[str, bytes]:
    server.claim(job_id)
    server.progress(job_id, Stage.prune, 0.5)
    return server.succeed(job_id, tmp_path)


def write_inputs(directory: Path, files: Files) -> Inputs:
    paths = Inputs(directory / "tiny.ts", directory / "digits.npz", directory / "weights.pt", directory / "whole.pt")
    paths.model.write_bytes(files.torchscript)
    paths.dataset.write_bytes(files.dataset_npz)
    paths.state_dict.write_bytes(files.state_dict)
    paths.unsafe.write_bytes(files.unsafe)
    return paths
