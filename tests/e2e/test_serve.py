"""``compactor serve`` as a real process tree: real uvicorn, real Celery worker, the real core.

Submit over HTTP, poll to success, download ``model.ts`` and load it with plain
torch in a fresh process; stop the tree with SIGTERM mid-job (exit 0, no child
outlives it) and check that a restart on the same data dir finishes the job;
SIGKILL the worker (the supervisor replaces it and the job resumes) and then the
whole tree mid-job, and check that a restart finishes the job; and the
submit-to-success path on Redis (broker and store).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.jobs import (
    QUICK_SPEC,
    Proc,
    child_env,
    children_of,
    command_line,
    finetune_spec,
    free_port,
    pid_alive,
    redis_or_skip,
    wait_answering,
    wait_for,
    write_digits_dataset,
    write_torchscript_model,
)

LEASE_SECONDS = "3"
REDIS_URL = "redis://127.0.0.1:6379/14"
# Celery's line once `compactor serve`'s first job worker consumes ("worker1@<host> ready.").
WORKER_READY = re.compile(r"worker1@\S* ready\.")


class Serve:
    """One ``compactor serve`` tree in its own session, so a test can SIGKILL all of it at once."""

    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [sys.executable, "-m", "launcher.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir), "--stop-timeout", "20"],
            child_env(data_dir, COMPACTOR_LEASE_SECONDS=LEASE_SECONDS, COMPACTOR_HEARTBEAT_SECONDS="0.5", **env),
            log_path,
            new_session=True,
        )
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_answering(self.proc, self.base, interval=0.2)
        # The worker too: a job submitted before it listens would still run, but the
        # tests' timings assume it is up.
        # (The notifier logs " ready." too, often first: wait for the job worker's own line.)
        wait_for(lambda: WORKER_READY.search(self.proc.log()), 60, "the worker to be ready", interval=0.2)

    def tree(self) -> list[int]:
        """Every descendant pid of the supervisor."""
        pids: list[int] = []
        frontier = [self.proc.pid]
        while frontier:
            children = children_of(frontier.pop())
            pids += children
            frontier += children
        return pids

    def close(self) -> None:
        self.client.close()
        if self.proc.process.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.process.wait()
        self.proc.close()


def niceness(pid: int) -> int:
    # /proc/<pid>/stat: the 19th field is the nice value (after the parenthesised command name).
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-inputs")
    return {"model": write_torchscript_model(root / "tiny.ts"), "dataset": write_digits_dataset(root / "digits.pt")}


@pytest.fixture()
def serves(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.close()


def submit(client: httpx.Client, inputs: dict[str, Path], spec: dict[str, Any]) -> dict[str, Any]:
    files = {
        "model": ("model.bin", inputs["model"].read_bytes(), "application/octet-stream"),
        "dataset": ("data.bin", inputs["dataset"].read_bytes(), "application/octet-stream"),
        "spec": (None, json.dumps(spec), "application/json"),
    }
    response = client.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    body: dict[str, Any] = response.json()
    return body


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_finished(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal job
        job = get_job(client, job_id)
        return job["status"] in {"succeeded", "failed", "cancelled"}

    try:
        wait_for(finished, timeout, f"job {job_id} to finish", interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {job}") from None
    return job


def download_and_load(client: httpx.Client, job: dict[str, Any], destination: Path) -> None:
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/model.ts")
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    recorded = next(a for a in job["artifacts"] if a["name"] == "model.ts")
    assert digest == recorded["sha256"] and response.headers["ETag"].strip('"') == digest
    assert int(response.headers["Content-Length"]) == recorded["size_bytes"] == len(response.content)
    destination.write_bytes(response.content)
    # Plain torch, a fresh interpreter, no Compactor code: what a user does with the file.
    script = "import sys, torch\nmodel = torch.jit.load(sys.argv[1])\nprint(tuple(model(torch.rand(4, 1, 8, 8)).shape))\n"
    loaded = subprocess.run(
        [sys.executable, "-I", "-W", "ignore", "-c", script, str(destination)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=destination.parent,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(4, 10)"


def wait_training(client: httpx.Client, job_id: str) -> None:
    def training() -> bool:
        current = get_job(client, job_id)
        assert current["status"] in {"queued", "running"}, current
        return current["stage"] == "finetune" and current["progress"] > 0

    wait_for(training, 60, "the job to be fine-tuning", interval=0.1)


def test_submit_download_and_a_graceful_restart_mid_job(tmp_path: Path, inputs, serves: list[Serve]) -> None:
    data_dir = tmp_path / "data"
    first = Serve(data_dir, tmp_path / "serve-1.log")
    serves.append(first)

    job = submit(first.client, inputs, QUICK_SPEC)
    done = wait_finished(first.client, job["id"], 90)
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1
    assert {"model.ts", "report.json"} <= {a["name"] for a in done["artifacts"]}
    download_and_load(first.client, done, tmp_path / "quick.ts")

    # Long enough to be interrupted: in a warm job child 100 epochs take only ~2-3 s here.
    long_job = submit(first.client, inputs, finetune_spec(epochs=300))
    wait_training(first.client, long_job["id"])
    children = first.tree()
    assert len(children) >= 2, "expected a gateway and a worker under the supervisor"
    # SIGTERM: the worker hands the job back at its next batch, the tree exits 0, no child outlives it.
    first.proc.process.send_signal(signal.SIGTERM)
    assert first.proc.process.wait(timeout=40) == 0, first.proc.log()[-4000:]
    orphans = [pid for pid in children if pid_alive(pid)]
    assert orphans == [], f"children outlived the tree: {orphans}"
    # Handed back, not finished: queued again, and the graceful stop did not use up an attempt.
    handed_back = get_job_from_store(data_dir, long_job["id"])
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 0, handed_back

    second = Serve(data_dir, tmp_path / "serve-2.log")
    serves.append(second)
    resumed = wait_finished(second.client, long_job["id"], 120)
    assert resumed["status"] == "succeeded", resumed
    # Only the attempt that ran to the end counts (the interrupted one was handed back).
    assert resumed["attempts"] == 1
    assert {"model.ts", "report.json"} <= {a["name"] for a in resumed["artifacts"]}


def test_killed_processes_are_recovered_after_the_lease_expires(tmp_path: Path, inputs, serves: list[Serve]) -> None:
    data_dir = tmp_path / "data"
    first = Serve(data_dir, tmp_path / "serve-1.log")
    serves.append(first)
    job = submit(first.client, inputs, finetune_spec(epochs=300))
    wait_training(first.client, job["id"])

    # 1. The worker alone dies (OOM killer, segfault): the supervisor starts a new one, whose
    #    reaper re-queues the job once the dead attempt's lease runs out.
    (worker_pid,) = [pid for pid in children_of(first.proc.pid) if "worker" in command_line(pid)]
    # Training yields the CPU to the gateway on a shared machine (COMPACTOR_WORKER_NICE=10 by serve).
    gateway_pid = next(pid for pid in children_of(first.proc.pid) if "gateway" in command_line(pid))
    assert (niceness(worker_pid), niceness(gateway_pid)) == (10, 0)
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(
        lambda: [pid for pid in children_of(first.proc.pid) if "worker" in command_line(pid) and pid != worker_pid],
        20,
        "the supervisor to start a new worker",
    )

    def second_attempt_training() -> bool:
        current = get_job(first.client, job["id"])
        assert current["status"] in {"queued", "running"}, current
        return current["attempts"] == 2 and current["stage"] == "finetune" and current["progress"] > 0

    wait_for(second_attempt_training, 60, "the second attempt to be fine-tuning")

    # 2. A power cut: every process of the tree dies at once; the job stays running under a
    #    lease nobody renews, and a new `compactor serve` on the same data dir finishes it.
    children = first.tree()
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.process.wait()
    wait_for(lambda: not any(pid_alive(pid) for pid in children), 20, "the killed tree to be gone")

    second = Serve(data_dir, tmp_path / "serve-2.log")
    serves.append(second)
    done = wait_finished(second.client, job["id"], 120)
    assert done["status"] == "succeeded", done
    # Whichever came first after the lease ran out — the restart's own delivery or the
    # reaper's — took the job over as a third attempt.
    assert done["attempts"] == 3


def get_job_from_store(data_dir: Path, job_id: str) -> dict[str, Any]:
    """Read the job with no server running (the SQLite file is the source of truth)."""
    from compactor.settings import Settings
    from compactor.store import open_store

    store = open_store(Settings(data_dir=data_dir).effective_store_url)
    try:
        job = store.get_job(job_id)
        assert job is not None
        return job.model_dump(mode="json")
    finally:
        store.close()


@pytest.fixture()
def redis_db() -> Iterator[str]:
    client = redis_or_skip(REDIS_URL)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.mark.redis
def test_submit_to_success_on_redis(tmp_path: Path, inputs, serves: list[Serve], redis_db: str) -> None:
    serve = Serve(tmp_path / "data", tmp_path / "serve.log", COMPACTOR_BROKER_URL=redis_db, COMPACTOR_STORE_URL=redis_db)
    serves.append(serve)
    assert serve.client.get("/readyz").status_code == 200
    job = submit(serve.client, inputs, QUICK_SPEC)
    done = wait_finished(serve.client, job["id"], 90)
    assert done["status"] == "succeeded", done
    # Loading it in plain torch is storage-independent and covered above; the bytes and their
    # recorded sha256 are what this path must get right.
    response = serve.client.get(f"/v1/jobs/{job['id']}/artifacts/model.ts")
    assert response.status_code == 200
    recorded = next(a for a in done["artifacts"] if a["name"] == "model.ts")
    assert hashlib.sha256(response.content).hexdigest() == recorded["sha256"]
    # The job lives in Redis, not in an SQLite file under the data dir.
    assert not (tmp_path / "data" / "jobs.sqlite3").exists()
    serve.proc.process.send_signal(signal.SIGTERM)
    assert serve.proc.process.wait(timeout=40) == 0, serve.proc.log()[-4000:]
