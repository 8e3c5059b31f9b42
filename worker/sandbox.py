"""Every job's compute runs in a child process the worker can kill; uploaded code only confined.

The worker (the parent) never loads or calls an uploaded model. For each attempt
it forks a child from a fork server that has torch and the compression core
imported already (a fork, not a new interpreter: ~3.5 s of imports saved), and
the child runs ``compress_files`` on the job's files:

* **Every job** gets a killable child with resource limits (address space, CPU
  seconds, file size, no core dumps). Cancellation, the soft and hard time
  limits and a worker shutdown take effect at once, whatever the child is doing
  (a stuck library call, a model whose forward never returns): the parent
  kills it. A crash, an out-of-memory error or a hang of the child fails the job
  and the worker takes the next one.
* **A TorchScript upload is a program**: its child is also confined by the
  kernel before it opens the archive (``worker/confinement.py``: Landlock,
  a network namespace, seccomp, no capabilities). State-dict and safetensors
  uploads are data and skip that.

Parent and child talk over a pipe in JSON only (``send_bytes``/``recv_bytes``,
bounded in size; never ``Connection.recv``, which unpickles): progress, then
one result or error. Artifacts come back as files in the attempt's scratch
directory; the parent adopts only regular, singly-linked files by name, after
the child has exited, so nothing the child does afterwards can swap them.

The fork server is started with an environment scrubbed of the worker's
secrets (API keys, store URLs, webhook secrets), so no child ever holds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import stat
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from compactor import catalogue, errors
from compactor.errors import Cancelled, CompactorError, InvalidModel

log = logging.getLogger(__name__)

# A progress or result message larger than this is the child misbehaving.
MAX_MESSAGE_BYTES = 32 * 1024**2
# Artifacts a job may hand back (the catalogue's exporters and the report); anything else in
# the scratch directory is ignored.
ARTIFACT_NAMES = catalogue.ARTIFACT_NAMES
POLL_SECONDS = 0.1
# Progress messages per second the child sends at most (stage changes always go through).
PROGRESS_RATE = 10.0

_context_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None
_FORK_SERVER_PRELOAD = ["worker.sandbox_server", "torch", "worker.sandbox", "worker.compression.pipeline", "worker.sandbox_warmup"]


@contextmanager
def _scrubbed_environ() -> Iterator[None]:
    from worker.confinement import scrubbed_environment

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(scrubbed_environment(saved))
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _server_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The fork server's context, (re)starting the server with a scrubbed environment.

    multiprocessing restarts a dead server by itself at the next ``Process.start`` — with the
    environment of that moment, the worker's secrets included — so every start goes through here."""
    global _context
    import multiprocessing.forkserver

    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_FORK_SERVER_PRELOAD)
            _context = context
        server = multiprocessing.forkserver._forkserver
        if not _server_alive(server._forkserver_pid):
            # The server inherits the environment it starts with; every job child inherits the server's.
            with _scrubbed_environ():
                server.ensure_running()
        return _context


def start_fork_server() -> None:
    """Start the fork server at worker start-up instead of at the first job (it imports torch
    and the core, ~3-5 s, in its own process while the worker starts)."""
    _forkserver()


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class ChildLimits:
    # Beyond what the child inherits from the fork server; None: unlimited (CUDA maps huge ranges).
    address_space_bytes: int | None
    cpu_seconds: int | None
    file_bytes: int | None
    # An uploaded archive must be loaded within this time (a crafted one can hang the loader).
    load_seconds: float


@dataclass(frozen=True)
class ChildJob:
    model_path: Path
    dataset_path: Path | None
    out_dir: Path
    spec: dict[str, Any]
    confined: bool
    limits: ChildLimits
    threads: int | None = None
    gpu: bool = False
    # The upload size limits, the same the gateway checked (compactor/limits.py); None: defaults.
    upload_limits: dict[str, Any] | None = None
    # The operator let uploaded TorchScript run without confinement (COMPACTOR_ALLOW_UNCONFINED_TORCHSCRIPT).
    unconfined_code_allowed: bool = False
    # The upload's format as the worker detected it (and decided confinement by); None: detect.
    model_format: str | None = None

    def request(self) -> bytes:
        body = asdict(self)
        body.update(model_path=str(self.model_path), out_dir=str(self.out_dir), dataset_path=str(self.dataset_path) if self.dataset_path else None)
        return json.dumps(body).encode()


@dataclass
class ChildResult:
    metrics: dict[str, Any]
    artifacts: dict[str, Path]
    # From the fork request to the child's first message (forked, confined, limits set).
    seconds_to_start: float
    # The child's own time, from its entry to its result.
    seconds_in_child: float
    # From the result message to this call's return: the child's exit and the artifacts' adoption.
    seconds_to_hand_off: float


class ChildFailed(CompactorError):
    """The child died without a result (a crash, a resource limit, a kill) or said something malformed."""

    code = "internal_error"


# ----------------------------------------------------------------------------- the child


def _child_main(conn: Connection, request: bytes) -> None:
    body = json.loads(request)
    body["entered"] = time.perf_counter()
    try:
        _run_child(conn, body)
    except BaseException as exc:  # noqa: BLE001 - every ending is reported to the parent as data
        _send(conn, {"error": _error_document(exc)})
        raise SystemExit(1) from None
    finally:
        conn.close()


def _send(conn: Connection, message: dict[str, Any]) -> None:
    # The parent went away or the message is too large: the exit code speaks.
    with contextlib.suppress(OSError, ValueError):
        conn.send_bytes(json.dumps(message, default=str).encode())


def _error_document(exc: BaseException) -> dict[str, Any]:
    from pydantic import ValidationError

    from worker.compression.context import is_memory_exhaustion
    from worker.confinement import ConfinementError

    if isinstance(exc, CompactorError):
        return exc.to_dict()
    if isinstance(exc, ConfinementError):
        return {"code": "confinement_unavailable", "message": f"the job's process could not be confined: {exc}"}
    if isinstance(exc, ValidationError):
        return {"code": "invalid_spec", "message": f"the stored spec is not valid: {exc.error_count()} error(s)"}
    if is_memory_exhaustion(exc):
        lines = [line for line in str(exc).splitlines() if "allocate" in line] or ["MemoryError"]
        return {"code": "memory_exhausted", "message": lines[-1].strip()[:300]}
    traceback.print_exc()
    return {"code": "internal_error", "message": f"an internal error stopped the job ({type(exc).__name__})"}


def _run_child(conn: Connection, body: dict[str, Any]) -> None:
    from worker.confinement import Policy, apply_limits, confine

    limits = body["limits"]
    out_dir = Path(body["out_dir"])
    inputs = tuple(Path(p) for p in (body["model_path"], body["dataset_path"]) if p)
    policy = Policy(
        scratch=out_dir,
        inputs=inputs,
        address_space_bytes=limits["address_space_bytes"],
        cpu_seconds=limits["cpu_seconds"],
        file_bytes=limits["file_bytes"],
        gpu=bool(body["gpu"]),
    )
    # The job, not its worker or the fork server, is what the kernel's OOM killer should take.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")
    if body["confined"]:
        confine(policy)  # before a single byte of the upload is read
    else:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the fork server
        apply_limits(policy)
    _send(conn, {"started": True})

    import torch

    from compactor.spec import parse_spec
    from worker.compression.pipeline import compress_files

    # Always, and before anything starts a thread: the first use of PyTorch's pthreadpool after a fork
    # replaces the pool inherited from the fork server, and two threads' first uses race (one gets no
    # pool and the child aborts with "Invalid thread pool!"; seen in CI when autograd's first backward
    # started its engine thread). set_num_threads makes that first use here, on the only thread.
    torch.set_num_threads(int(body["threads"]) if body["threads"] else torch.get_num_threads())
    spec = parse_spec(body["spec"])
    last = {"stage": "", "at": 0.0}

    def progress(stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != last["stage"] or now - last["at"] >= 1.0 / PROGRESS_RATE:
            last.update(stage=stage, at=now)
            _send(conn, {"progress": [stage, fraction]})

    from compactor.limits import Limits

    result = compress_files(
        Path(body["model_path"]),
        spec,
        out_dir,
        dataset_path=Path(body["dataset_path"]) if body["dataset_path"] else None,
        progress=progress,
        limits=Limits.from_json(body["upload_limits"]) if body.get("upload_limits") else None,
        trusted_code=bool(body["unconfined_code_allowed"]),
        model_format=body.get("model_format"),
    )
    artifacts = sorted(Path(p).name for p in result.artifacts.values())
    seconds = time.perf_counter() - body["entered"]
    _send(conn, {"result": {"metrics": result.metrics, "artifacts": artifacts, "seconds": seconds}})


# ----------------------------------------------------------------------------- the parent

_ERRORS_BY_CODE: dict[str, type[CompactorError]] = {
    cls.code: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, CompactorError) and cls is not CompactorError
}


def _error_from(document: dict[str, Any], memory_hint: str) -> CompactorError:
    code = str(document.get("code", "internal_error"))
    message = str(document.get("message", ""))[:2000]
    field = document.get("field")
    if code == "memory_exhausted":
        return InvalidModel(f"the job ran out of memory ({message}); {memory_hint}")
    cls = _ERRORS_BY_CODE.get(code)
    if cls is None:
        error = CompactorError(message, field=field if isinstance(field, str) else None)
        error.code = code if code in ("internal_error", "confinement_unavailable") else "internal_error"
        return error
    return cls(message, field=field if isinstance(field, str) else None)


def _adopt_artifacts(out_dir: Path, names: object) -> dict[str, Path]:
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ChildFailed("the job's process returned a malformed artifact list")
    adopted: dict[str, Path] = {}
    for name in names:
        if name not in ARTIFACT_NAMES:
            raise ChildFailed(f"the job's process returned an unexpected artifact {name[:80]!r}")
        path = out_dir / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ChildFailed(f"the job's process did not write {name}") from None
        # A symlink or a hard link could point the download at a file of the worker's.
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise ChildFailed(f"the artifact {name} is not a plain file")
        adopted[name] = path
    return adopted


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _parse_message(data: bytes) -> dict[str, Any]:
    # The child may run hostile code: what it says is checked like any other input.
    try:
        message = json.loads(data)
    except ValueError:
        raise ChildFailed("the job's process sent a malformed message") from None
    if not isinstance(message, dict):
        raise ChildFailed("the job's process sent a malformed message")
    result = message.get("result")
    if result is not None and not (isinstance(result, dict) and isinstance(result.get("metrics"), dict)):
        raise ChildFailed("the job's process sent a malformed result")
    error = message.get("error")
    if error is not None and not isinstance(error, dict):
        raise ChildFailed("the job's process sent a malformed error")
    return message


def _parse_progress(value: object) -> tuple[str, float]:
    try:
        name, fraction = value  # type: ignore[misc]
        return str(name)[:64], float(fraction)
    except (TypeError, ValueError):
        raise ChildFailed("the job's process sent malformed progress") from None


def run_in_child(job: ChildJob, *, progress: Callable[[str, float], None], should_stop: Callable[[], bool]) -> ChildResult:
    """Run ``compress_files`` for ``job`` in a child; raise what the child raised, as the parent's own.

    Raises Cancelled (after killing the child) as soon as ``should_stop()`` is true; the caller
    knows why (cancel, time limit, shutdown, lost lease)."""
    started = time.perf_counter()
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, job.request()), daemon=True, name="compactor-job")
    child.start()
    send.close()
    final: dict[str, Any] | None = None
    seconds_to_start = 0.0
    received = 0.0
    stage = "load"
    load_deadline = time.monotonic() + job.limits.load_seconds
    try:
        while final is None:
            if receive.poll(POLL_SECONDS):
                try:
                    data = receive.recv_bytes(MAX_MESSAGE_BYTES)
                except EOFError:
                    break
                except OSError:
                    raise ChildFailed("the job's process sent a message larger than the limit") from None
                message = _parse_message(data)
                if "started" in message:
                    seconds_to_start = time.perf_counter() - started
                elif "progress" in message:
                    stage, fraction = _parse_progress(message["progress"])
                    progress(stage, fraction)
                elif "result" in message or "error" in message:
                    final = message
                    received = time.perf_counter()
            elif not child.is_alive() and not receive.poll(0):
                break  # it exited and everything it said has been read
            if should_stop():
                raise Cancelled("the job was stopped")
            if stage == "load" and time.monotonic() > load_deadline and final is None:
                raise InvalidModel(
                    f"loading the model took longer than {job.limits.load_seconds:.0f} s and was stopped; "
                    "re-export it, or upload a state_dict with spec.model.arch"
                )
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        receive.close()
    exitcode = child.exitcode
    child.close()

    memory_hint = (
        f"the job may use {job.limits.address_space_bytes / 2**30:.1f} GiB (COMPACTOR_JOB_MEMORY_BYTES)"
        if job.limits.address_space_bytes
        else "the worker has no memory left"
    )
    if final is None:
        raise _silent_death(exitcode, job, memory_hint)
    if "error" in final:
        raise _error_from(final["error"], memory_hint)
    result = final["result"]
    artifacts = _adopt_artifacts(job.out_dir, result["artifacts"])
    return ChildResult(
        metrics=result["metrics"],
        artifacts=artifacts,
        seconds_to_start=seconds_to_start,
        seconds_in_child=float(result.get("seconds", 0.0)),
        seconds_to_hand_off=time.perf_counter() - received,
    )


def _silent_death(exitcode: int | None, job: ChildJob, memory_hint: str) -> CompactorError:
    how = _exit_description(exitcode)
    if exitcode == -signal.SIGXCPU:
        return errors.JobTimeout(f"the job used more CPU time than its limit ({job.limits.cpu_seconds} s) and was stopped")
    if exitcode == -signal.SIGXFSZ:
        return InvalidModel(f"the job tried to write a file larger than {job.limits.file_bytes} bytes and was stopped")
    if exitcode == -signal.SIGKILL:
        return InvalidModel(f"the job's process was killed (SIGKILL): most often the kernel ran out of memory; {memory_hint}")
    if job.confined:
        return InvalidModel(f"the uploaded TorchScript program crashed the job's process (it {how}); the job was stopped")
    return ChildFailed(f"the job's process {how} without a result")


# ----------------------------------------------------------------------------- confinement self-test


@dataclass(frozen=True)
class ConfinementStatus:
    available: bool
    reason: str


_status_lock = threading.Lock()
_status: ConfinementStatus | None = None


def _self_test_child(conn: Connection, request: bytes) -> None:
    body = json.loads(request)
    failures: list[str] = []
    try:
        from worker.confinement import Policy, confine

        scratch = Path(body["scratch"])
        confine(Policy(scratch=scratch, inputs=(Path(body["input"]),), address_space_bytes=2 * 1024**3, cpu_seconds=60, file_bytes=1024**2))
        checks: list[tuple[str, Callable[[], object], bool]] = [
            ("read a file outside", lambda: Path(body["canary"]).read_bytes(), False),
            ("write a file outside", lambda: Path(body["canary"]).write_bytes(b"x"), False),
            ("create a file outside", lambda: Path(body["canary"]).with_name("created").write_bytes(b"x"), False),
            ("open a socket", lambda: __import__("socket").socket(), False),
            ("start a program", lambda: os.execv("/bin/true", ["/bin/true"]), False),
            ("fork", lambda: os.fork(), False),
            ("read its input", lambda: Path(body["input"]).read_bytes(), True),
            ("write its scratch directory", lambda: (scratch / "written").write_bytes(b"x"), True),
            ("run torch on threads", lambda: _torch_works(), True),
        ]
        for what, action, allowed in checks:
            try:
                action()
                worked = True
            except Exception:  # noqa: BLE001 - a refusal is what most checks want
                worked = False
            if worked != allowed:
                failures.append(f"could {'not ' if allowed else ''}{what}")
    except BaseException as exc:  # noqa: BLE001
        failures.append(f"{type(exc).__name__}: {exc}")
    _send(conn, {"failures": failures})
    conn.close()


def _torch_works() -> None:
    import torch

    torch.set_num_threads(2)
    value = (torch.ones(256, 256) @ torch.ones(256, 256)).sum().item()
    if value != 256.0**3:
        raise RuntimeError("wrong result")


def confinement_status(data_dir: Path, *, refresh: bool = False) -> ConfinementStatus:
    """Whether confinement holds on this kernel (tested once per worker process, ~0.1 s)."""
    global _status
    with _status_lock:
        if _status is None or refresh:
            _status = _run_self_test(data_dir)
            if _status.available:
                log.info("job confinement available (Landlock, network namespace, seccomp, no capabilities)")
            else:
                log.warning("job confinement unavailable: %s", _status.reason)
        return _status


def _run_self_test(data_dir: Path) -> ConfinementStatus:
    from worker.confinement import ConfinementError, check_data_dir_outside, landlock_abi

    try:
        check_data_dir_outside(data_dir)
    except ConfinementError as exc:
        return ConfinementStatus(False, str(exc))
    if landlock_abi() < 1:
        return ConfinementStatus(False, "Landlock is not available in this kernel (Linux ≥ 5.13 with Landlock in the 'lsm=' list)")
    with tempfile.TemporaryDirectory(prefix="compactor-confinement-") as root:
        base = Path(root)
        (base / "scratch").mkdir()
        (base / "outside").mkdir()
        canary = base / "outside" / "canary"
        canary.write_bytes(b"canary")
        source = base / "input"
        source.write_bytes(b"input")
        request = json.dumps({"scratch": str(base / "scratch"), "input": str(source), "canary": str(canary)}).encode()
        context = _forkserver()
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_self_test_child, args=(send, request), daemon=True, name="compactor-confinement-test")
        child.start()
        send.close()
        try:
            if not receive.poll(60):
                return ConfinementStatus(False, "the confinement self-test did not answer within 60 s")
            answer = json.loads(receive.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, OSError, ValueError):
            return ConfinementStatus(False, f"the confinement self-test {_exit_description(child.exitcode)} without an answer")
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
            receive.close()
        failures = answer.get("failures", ["no answer"])
        if canary.read_bytes() != b"canary" or (base / "outside" / "created").exists():
            failures.append("a file outside the scratch directory changed")
        if failures:
            return ConfinementStatus(False, "; ".join(str(failure) for failure in failures))
    return ConfinementStatus(True, "")


__all__ = [
    "ARTIFACT_NAMES",
    "ChildJob",
    "ChildLimits",
    "ChildResult",
    "ConfinementStatus",
    "confinement_status",
    "run_in_child",
    "start_fork_server",
]
