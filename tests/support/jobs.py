"""Real-process helpers for the worker and end-to-end tests: start processes, wait, inspect."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from compactor.jobs import Job, JobStatus, Upload, new_id
from compactor.spec import parse_spec
from compactor.storage import LocalStorage
from compactor.store.base import JobStore
from tests.support.models import TinyCNN, load_digits_tensors

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANT = "default"
T = TypeVar("T")

# Cheap: only the Linear head is quantized; the core still evaluates and benchmarks.
QUICK_SPEC: dict[str, Any] = {"model": {"input_shape": [1, 1, 8, 8]}, "quantize": {"mode": "dynamic"}}


def finetune_spec(epochs: int) -> dict[str, Any]:
    """A spec whose fine-tuning keeps the worker busy for a while (long enough to interrupt)."""
    return {"model": {"input_shape": [1, 1, 8, 8]}, "finetune": {"epochs": epochs, "lr": 0.01}}


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- inputs


def write_torchscript_model(path: Path, seed: int = 0, width: int = 8) -> Path:
    """An untrained narrow TinyCNN: the worker's job is to run the pipeline, not to reach accuracy,
    and a narrow one keeps fine-tuning cheap on two shared cores."""
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(TinyCNN(width=width).eval()), str(path))
    return path


def write_digits_dataset(path: Path, samples: int = 480) -> Path:
    """Real digits, [N,1,8,8] with labels, cut to ``samples`` so each epoch is short."""
    inputs, targets, _, _ = load_digits_tensors()
    torch.save({"inputs": inputs[:samples], "targets": targets[:samples]}, str(path))
    return path


def add_upload(store: JobStore, storage: LocalStorage, source: Path, kind: str, fmt: str) -> str:
    upload_id = new_id("mdl" if kind == "model" else "dst")
    destination = storage.upload_path(upload_id)
    shutil.copyfile(source, destination)
    store.put_upload(
        Upload(
            id=upload_id,
            tenant=TENANT,
            kind=kind,
            format=fmt,
            size_bytes=destination.stat().st_size,
            sha256=sha256_of(destination),
        )
    )
    return upload_id


def create_job(store: JobStore, storage: LocalStorage, model: Path, spec: Mapping[str, Any], dataset: Path | None = None) -> Job:
    """A queued job as the gateway would create it: uploads in storage, the full spec stored."""
    model_id = add_upload(store, storage, model, "model", "torchscript")
    dataset_id = add_upload(store, storage, dataset, "dataset", "pt") if dataset is not None else None
    job = Job(
        id=new_id("job"),
        tenant=TENANT,
        model_id=model_id,
        dataset_id=dataset_id,
        spec=parse_spec(dict(spec)).model_dump(mode="json"),
    )
    return store.create_job(job)


def wait_status(store: JobStore, job_id: str, statuses: set[JobStatus], timeout: float) -> Job:
    def reached() -> Job | None:
        job = store.get_job(job_id)
        return job if job is not None and job.status in statuses else None

    try:
        return wait_for(reached, timeout, f"job {job_id} to become {sorted(s.value for s in statuses)}")
    except AssertionError:
        job = store.get_job(job_id)
        raise AssertionError(f"job {job_id} is {job.status.value if job else 'missing'}: {job!r}") from None


# -- processes


def child_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPACTOR_")}
    env.update({"COMPACTOR_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


class Proc:
    """A child process whose output goes to a log file the test can read."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path, *, new_session: bool = False) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - held for the process's lifetime, closed when it stops
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=new_session)
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if self.process.poll() is not None and text not in self.log():
                raise AssertionError(f"pid {self.pid} exited ({self.process.returncode}) before logging {text!r}:\n{self.log()[-4000:]}")
            return text in self.log()

        try:
            wait_for(seen, timeout, f"{text!r} in {self.log_path.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log tail ---\n{self.log()[-4000:]}") from None

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()


def start_worker(data_dir: Path, log_path: Path, name: str = "w1@%h", **env: str) -> Proc:
    proc = Proc(
        [sys.executable, "-m", "launcher.cli", "worker", "--name", name],
        child_env(data_dir, **env),
        log_path,
    )
    proc.wait_log(" ready.", timeout=30)
    return proc


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), alive or zombie."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (after the parenthesised command, which may hold spaces) is the parent pid.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_answering(proc: Proc, base_url: str, timeout: float = 60, interval: float = 0.1) -> None:
    """Until the HTTP server ``proc`` runs answers ``GET /healthz`` with 200; fails at once if it exits."""
    import httpx

    def answering() -> bool:
        if proc.process.poll() is not None:
            raise AssertionError(f"pid {proc.pid} exited with {proc.process.returncode}:\n{proc.log()[-4000:]}")
        try:
            return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answering, timeout, f"{base_url} to answer /healthz", interval=interval)


def redis_or_skip(url: str) -> Any:
    """A client of the Redis at ``url`` once it answers a ping; else the test is skipped, or
    fails when COMPACTOR_REQUIRE_REDIS=1 (CI, where Redis is part of the environment)."""
    import pytest
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        if os.environ.get("COMPACTOR_REQUIRE_REDIS") == "1":
            pytest.fail(f"COMPACTOR_REQUIRE_REDIS=1 but Redis at {url} does not answer: {exc}")
        pytest.skip(f"no Redis at {url}: {exc}")
    return client
