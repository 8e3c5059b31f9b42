"""Every job runs in a child the worker can kill; uploaded TorchScript runs only confined.

Real files, a real SQLite store, the real runner and the real fork server; the
hostile models are real TorchScript programs (tests/support/hostile_models.py).
"""

from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from compactor.jobs import JobStatus
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from tests.support import hostile_models
from tests.support.jobs import QUICK_SPEC, children_of, create_job, wait_for, write_torchscript_model
from worker import sandbox
from worker.confinement import Policy, confine, scrubbed_environment
from worker.runner import Outcome, execute_job

SECRET = b"canary-7f3a9c2e-not-for-tenants\n"


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_torchscript_model(tmp_path_factory.mktemp("sandbox") / "tiny.ts")


@contextmanager
def parts_with(tmp_path: Path, **overrides: object) -> Iterator[tuple[Settings, JobStore, LocalStorage]]:
    """A worker's settings (with ``overrides``), a SQLite store and storage under ``tmp_path``."""
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=3.0, heartbeat_seconds=0.2, **overrides)
    store = open_store(settings.effective_store_url)
    try:
        yield settings, store, LocalStorage(settings.resolved_data_dir)
    finally:
        store.close()


@pytest.fixture()
def parts(tmp_path: Path) -> Iterator[tuple[Settings, JobStore, LocalStorage]]:
    with parts_with(tmp_path) as made:
        yield made


def job_children() -> list[int]:
    """Live children of the fork server: the job processes."""
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    return children_of(server) if server else []


def test_confinement_holds_on_this_kernel(tmp_path: Path) -> None:
    status = sandbox.confinement_status(tmp_path, refresh=True)
    assert status.available, status.reason


def test_a_data_dir_inside_the_readable_roots_makes_confinement_unavailable() -> None:
    import torch as torch_package

    status = sandbox.confinement_status(Path(torch_package.__file__).parent / "data", refresh=True)
    assert not status.available and "COMPACTOR_DATA_DIR" in status.reason
    sandbox.confinement_status(Path("/nonexistent-compactor-data"), refresh=True)


def test_the_worker_never_loads_or_calls_the_uploaded_model(parts, good_archive: Path, monkeypatch) -> None:
    settings, store, storage = parts

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the worker process itself loaded an uploaded model")

    # Only this (the worker's) process is patched; the job's child is forked from the fork server.
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr("worker.compression.pipeline.compress_files", refuse)
    job = create_job(store, storage, good_archive, QUICK_SPEC)
    assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
    done = store.get_job(job.id)
    assert done is not None and done.status is JobStatus.succeeded, done
    assert {artifact.name for artifact in done.artifacts} >= {"model.ts", "report.json"}


def test_the_fork_server_and_its_children_hold_no_secrets(parts, good_archive: Path) -> None:
    settings, store, storage = parts
    sandbox.start_fork_server()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert not [entry for entry in environ if entry.startswith(b"COMPACTOR_")]
    assert scrubbed_environment({"COMPACTOR_API_KEYS": "t:k", "REDIS_URL": "x", "OMP_NUM_THREADS": "2", "PATH": "/bin"}) == {
        "OMP_NUM_THREADS": "2",
        "PATH": "/bin",
    }
    # Warmed up (a job was served) and still single-threaded: forking a process whose other
    # threads may hold locks (tqdm's monitor, started by torch.export's tracer) is unsafe.
    assert_next_job_runs(store, storage, settings, good_archive)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    threads = next(line for line in Path(f"/proc/{server}/status").read_text().splitlines() if line.startswith("Threads:"))
    assert threads.split()[1] == "1", threads


def assert_next_job_runs(store: JobStore, storage: LocalStorage, settings: Settings, archive: Path) -> None:
    """The same worker code goes on to run a healthy job to success."""
    healthy = create_job(store, storage, archive, QUICK_SPEC)
    assert execute_job(healthy.id, store, storage, settings, "me") is Outcome.finished
    done = store.get_job(healthy.id)
    assert done is not None and done.status is JobStatus.succeeded, done


def _run_and_interfere(store: JobStore, storage: LocalStorage, settings: Settings, job_id: str, interfere, *, after: float = 1.0) -> float:
    """execute_job in this thread while ``interfere`` runs once the job's child is busy; returns
    the seconds from the interference to the end of the attempt."""
    moments: dict[str, float] = {}

    def act() -> None:
        wait_for(lambda: job_children(), 60, "the job's child to start")
        time.sleep(after)
        moments["at"] = time.monotonic()
        interfere()

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    assert execute_job(job_id, store, storage, settings, "me") is Outcome.finished
    ended = time.monotonic()
    thread.join(5)
    return ended - moments.get("at", ended)


def test_cancel_stops_a_job_stuck_in_its_forward_pass_at_once(parts, tmp_path: Path, good_archive: Path) -> None:
    settings, store, storage = parts
    stuck = create_job(store, storage, hostile_models.save(hostile_models.never_returns(), tmp_path / "stuck.ts"), QUICK_SPEC)
    took = _run_and_interfere(store, storage, settings, stuck.id, lambda: store.request_cancel(stuck.id, "default"))
    assert store.get_job(stuck.id).status is JobStatus.cancelled
    assert took < 5.0, f"the cancel took {took:.1f} s"
    wait_for(lambda: not job_children(), 10, "the stuck child to be gone")
    assert_next_job_runs(store, storage, settings, good_archive)


def test_the_time_limit_stops_a_job_stuck_in_its_forward_pass(tmp_path: Path, good_archive: Path) -> None:
    with parts_with(tmp_path, job_soft_time_limit=3.0, job_hard_time_limit=60.0) as (settings, store, storage):
        stuck = create_job(store, storage, hostile_models.save(hostile_models.never_returns(), tmp_path / "stuck.ts"), QUICK_SPEC)
        started = time.monotonic()
        assert execute_job(stuck.id, store, storage, settings, "me") is Outcome.finished
        took = time.monotonic() - started
        job = store.get_job(stuck.id)
        assert job.status is JobStatus.failed and job.error.code == "timeout", job
        assert took < 3.0 + 5.0, f"stopped after {took:.1f} s"
        # The same worker goes on (with a limit a normal job fits in on two busy cores).
        relaxed = settings.model_copy(update={"job_soft_time_limit": 600.0, "job_hard_time_limit": 660.0})
        assert_next_job_runs(store, storage, relaxed, good_archive)


def test_a_crash_of_the_child_fails_the_job_and_the_next_runs(parts, tmp_path: Path, good_archive: Path) -> None:
    settings, store, storage = parts
    stuck = create_job(store, storage, hostile_models.save(hostile_models.never_returns(), tmp_path / "crash.ts"), QUICK_SPEC)

    def segfault() -> None:
        for pid in job_children():
            os.kill(pid, signal.SIGSEGV)

    _run_and_interfere(store, storage, settings, stuck.id, segfault)
    job = store.get_job(stuck.id)
    assert job.status is JobStatus.failed and job.error.code == "invalid_model", job
    assert "crashed" in job.error.message and "SIGSEGV" in job.error.message
    assert_next_job_runs(store, storage, settings, good_archive)


def test_memory_exhaustion_in_the_child_fails_the_job_and_the_next_runs(tmp_path: Path, good_archive: Path) -> None:
    with parts_with(tmp_path, job_memory_bytes=1024**3) as (settings, store, storage):
        hog = create_job(store, storage, hostile_models.save(hostile_models.eats_memory(), tmp_path / "hog.ts"), QUICK_SPEC)
        assert execute_job(hog.id, store, storage, settings, "me") is Outcome.finished
        job = store.get_job(hog.id)
        assert job.status is JobStatus.failed and job.error.code == "invalid_model", job
        assert "memory" in job.error.message and "COMPACTOR_JOB_MEMORY_BYTES" in job.error.message
        assert_next_job_runs(store, storage, settings, good_archive)


def test_a_load_that_takes_too_long_is_invalid_model(tmp_path: Path) -> None:
    with parts_with(tmp_path, torchscript_probe_seconds=1.0) as (settings, store, storage):
        hang = create_job(store, storage, hostile_models.save(hostile_models.slow_to_load(), tmp_path / "hang.ts"), QUICK_SPEC)
        started = time.monotonic()
        assert execute_job(hang.id, store, storage, settings, "me") is Outcome.finished
        done = store.get_job(hang.id)
        assert done.status is JobStatus.failed and done.error.code == "invalid_model" and "longer than" in done.error.message
        assert time.monotonic() - started < 10


# ------------------------------------------------------------------ the three attacks, through the worker


@pytest.fixture()
def targets(tmp_path: Path) -> dict[str, Path]:
    return hostile_models.attack_targets(tmp_path / "outside", SECRET)


def _attack_models(targets: dict[str, Path], other_upload: Path) -> dict[str, torch.nn.Module]:
    return hostile_models.attacks(targets, len(SECRET), other_upload)


def _assert_untouched(targets: dict[str, Path], victim_bytes: bytes) -> None:
    assert targets["victim"].read_bytes() == victim_bytes
    assert not targets["new"].exists()


def test_the_attacks_fail_unsafe_model_in_the_worker(parts, tmp_path: Path, targets: dict[str, Path], good_archive: Path) -> None:
    settings, store, storage = parts
    other = create_job(store, storage, good_archive, QUICK_SPEC)
    other_upload = storage.upload_path(other.model_id)
    victim_bytes = targets["victim"].read_bytes()
    for what, model in _attack_models(targets, other_upload).items():
        job = create_job(store, storage, hostile_models.save(model, tmp_path / "attack.ts"), QUICK_SPEC)
        assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
        done = store.get_job(job.id)
        assert done.status is JobStatus.failed, (what, done)
        assert done.error.code == "unsafe_model" and "aten::from_file" in done.error.message, (what, done.error)
        assert not done.artifacts
    _assert_untouched(targets, victim_bytes)


def _unchecked_attack_child(conn: Connection, request: bytes) -> None:
    """The second layer alone: confine as the worker does, then load and run the hostile
    program with no allowlist check at all."""
    body = json.loads(request)
    confine(Policy(scratch=Path(body["scratch"]), inputs=(Path(body["model"]),), address_space_bytes=4 * 1024**3))
    outcome: dict[str, object] = {"environ": sorted(os.environ)}
    try:
        module = torch.jit.load(body["model"])  # noqa: S614 - deliberately unchecked, inside confinement
        output = module(torch.zeros(1, 1, 8, 8))
        loot = getattr(module, "loot", None)
        outcome["ran"] = True
        outcome["loot"] = bytes(loot.tolist()).hex() if loot is not None else None
        outcome["output"] = output.shape[1]
    except Exception as exc:  # noqa: BLE001 - the refusal is the expected outcome
        outcome["ran"] = False
        outcome["error"] = str(exc)[-400:]
    conn.send_bytes(json.dumps(outcome).encode())
    conn.close()


def test_confinement_alone_holds_the_attacks(tmp_path: Path, targets: dict[str, Path], good_archive: Path) -> None:
    storage = LocalStorage(tmp_path / "data")
    other_upload = storage.upload_path("mdl_other")
    other_upload.write_bytes(SECRET)
    victim_bytes = targets["victim"].read_bytes()
    context = sandbox._forkserver()
    for what, model in _attack_models(targets, other_upload).items():
        scratch = tmp_path / f"scratch-{len(what)}"
        scratch.mkdir()
        archive = hostile_models.save(model, scratch.parent / f"{scratch.name}.ts")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_unchecked_attack_child,
            args=(send, json.dumps({"scratch": str(scratch), "model": str(archive)}).encode()),
            daemon=True,
        )
        child.start()
        send.close()
        assert receive.poll(120), what
        outcome = json.loads(receive.recv_bytes())
        child.join(30)
        assert outcome["ran"] is False, (what, outcome)
        assert "Permission denied" in outcome["error"], (what, outcome)
        assert SECRET.hex() not in json.dumps(outcome)
        assert not [name for name in outcome["environ"] if name.startswith("COMPACTOR_")]
    _assert_untouched(targets, victim_bytes)


# ------------------------------------------------------------------ what the child says is input too


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"result": {"metrics": []}}', b'{"result": 3}', b'{"error": "boom"}'],
)
def test_a_malformed_message_from_the_child_fails_the_job(data: bytes) -> None:
    with pytest.raises(sandbox.ChildFailed, match="malformed"):
        sandbox._parse_message(data)


def test_malformed_progress_fails_the_job_and_long_stage_names_are_cut() -> None:
    with pytest.raises(sandbox.ChildFailed):
        sandbox._parse_progress(["load"])
    with pytest.raises(sandbox.ChildFailed):
        sandbox._parse_progress(["load", "half"])
    assert sandbox._parse_progress(["x" * 500, 0.5]) == ("x" * 64, 0.5)


def test_an_error_code_the_worker_does_not_know_becomes_internal_error() -> None:
    error = sandbox._error_from({"code": "succeeded_trust_me", "message": "hi"}, "hint")
    assert error.code == "internal_error"
    known = sandbox._error_from({"code": "unsafe_model", "message": "calls aten::from_file", "field": "model"}, "hint")
    assert known.code == "unsafe_model" and known.field == "model"
    memory = sandbox._error_from({"code": "memory_exhausted", "message": "can't allocate"}, "the job may use 1.0 GiB")
    assert memory.code == "invalid_model" and "1.0 GiB" in memory.message


# ------------------------------------------------------------------ a kernel that cannot confine


@pytest.fixture()
def no_landlock(monkeypatch, tmp_path: Path):
    """This kernel as an older one without Landlock (the only stand-in: the check is real otherwise)."""
    monkeypatch.setattr("worker.confinement.landlock_abi", lambda: 0)
    sandbox.confinement_status(tmp_path, refresh=True)
    yield
    monkeypatch.undo()
    sandbox.confinement_status(tmp_path, refresh=True)


def test_without_confinement_a_torchscript_job_is_refused_naming_the_setting(no_landlock, parts, good_archive: Path) -> None:
    settings, store, storage = parts
    job = create_job(store, storage, good_archive, QUICK_SPEC)
    assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
    done = store.get_job(job.id)
    assert done.status is JobStatus.failed and done.error.code == "confinement_unavailable", done
    assert "Landlock" in done.error.message and "COMPACTOR_ALLOW_UNCONFINED_TORCHSCRIPT" in done.error.message


def test_the_operator_opt_out_runs_it_unconfined_and_the_report_says_so(no_landlock, tmp_path: Path, good_archive: Path) -> None:
    with parts_with(tmp_path, allow_unconfined_torchscript=True) as (settings, store, storage):
        job = create_job(store, storage, good_archive, QUICK_SPEC)
        assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
        done = store.get_job(job.id)
        assert done.status is JobStatus.succeeded, done
        assert any("without kernel confinement" in warning for warning in done.metrics["warnings"])


def test_the_configured_parameter_limit_reaches_the_job_child(tmp_path: Path, good_archive: Path) -> None:
    # COMPACTOR_MAX_PARAMETERS used to be read by nothing; the child now loads within Settings' limits.
    with parts_with(tmp_path, max_parameters=100) as (settings, store, storage):
        job = create_job(store, storage, good_archive, QUICK_SPEC)
        assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
        done = store.get_job(job.id)
        assert done.status is JobStatus.failed and done.error.code == "model_too_large", done
        assert "100 parameters" in done.error.message


def test_a_timm_architecture_and_a_pt2_upload_lose_channels_in_the_job_child(parts, tmp_path: Path) -> None:
    """model.arch 'timm/<name>' builds from timm (never its hub) in the job's child; a .pt2
    upload is read by the safe reader there; both come back with real channel pruning."""
    import safetensors.torch
    import timm

    settings, store, storage = parts
    torch.manual_seed(0)
    model = timm.create_model("resnet18d", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "resnet18d.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    program = tmp_path / "resnet18d.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}}), program)
    channels = {"model": {"input_shape": [1, 3, 32, 32]}, "prune": {"granularity": "channel", "amount": 0.5}}
    jobs = {
        "timm": create_job(
            store, storage, weights, {**channels, "model": {**channels["model"], "arch": "timm/resnet18d", "arch_kwargs": {"num_classes": 10}}}
        ),
        "pt2": create_job(store, storage, program, channels),
    }
    ratios = {}
    for name, job in jobs.items():
        assert execute_job(job.id, store, storage, settings, "me") is Outcome.finished
        done = store.get_job(job.id)
        assert done.status is JobStatus.succeeded, done
        assert {artifact.name for artifact in done.artifacts} >= {"model.ts", "model.pt2", "report.json"}
        ratios[name] = done.metrics["ratios"]["macs"]
    assert ratios["timm"] < 0.35
    assert ratios["pt2"] == pytest.approx(ratios["timm"], abs=0.02)
