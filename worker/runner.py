"""Runs one attempt of one job: the service function behind the Celery task.

    claim (lease) → heartbeat thread → compress_files in a child process (worker/sandbox.py),
    into a temp dir → put artifacts → finish

The worker itself never loads or calls an uploaded model: the child does, confined by the
kernel when the upload is a TorchScript program, and a cancel, a time limit or a shutdown
kills the child whatever it is doing.

The store is the source of truth, so this function is safe to call for any
delivery of any message: a job that is missing, finished, cancelled, or leased
by a live attempt is left alone (``claim`` returns None). Every way the core can
end maps to exactly one terminal state:

    success                         → succeeded, artifacts moved into storage, metrics recorded
    Cancelled after a cancel request → cancelled
    soft time limit                  → failed/timeout, no artifacts
    CompactorError (bad input)       → failed with its code and message
    anything else                    → failed/internal_error (traceback logged, never stored)
    worker shutting down             → not finished: queued again (attempt not counted); the caller re-enqueues
    lease lost                       → nothing written; the attempt that took over owns the job

torch and the compression core are imported lazily, inside the worker process
only, so importing this module (the Celery parent, the CLI) never loads torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from compactor.errors import Cancelled, CompactorError, ConfinementUnavailable
from compactor.jobs import Artifact, Job, JobError, JobStatus
from compactor.limits import Limits
from compactor.logs import job_context
from compactor.settings import Settings
from compactor.spec import JobSpec, parse_spec
from compactor.store.base import JobStore
from worker.lease import LeaseKeeper, StopReason
from worker.metrics import record_finished_job
from worker.sandbox import ChildJob, ChildLimits

if TYPE_CHECKING:
    from compactor.storage import LocalStorage

log = logging.getLogger(__name__)

# Temp dirs of an attempt live inside the job's dir (same filesystem, so moving
# an artifact into place is a rename) under this prefix; a later attempt of the
# same job removes the ones a killed attempt left behind.
ATTEMPT_DIR_PREFIX = ".attempt-"
# A store outage while recording the outcome is retried this many times.
FINISH_TRIES = 5
HARD_LIMIT_MARGIN_SECONDS = 5.0


class Outcome(StrEnum):
    skipped = "skipped"  # claim refused: nothing ran
    finished = "finished"  # the job reached a terminal state by this attempt
    interrupted = "interrupted"  # the worker is stopping: job handed back to queued, the caller re-enqueues
    lost = "lost"  # the lease was taken over; nothing was recorded


def _soft_timeout_types() -> tuple[type[BaseException], ...]:
    # Celery's prefork pool raises this on the soft time limit; the solo pool never does
    # (LeaseKeeper enforces the limit there). Imported lazily to keep celery optional here.
    try:
        from celery.exceptions import SoftTimeLimitExceeded
    except ImportError:  # pragma: no cover - celery is a dependency
        return ()
    return (SoftTimeLimitExceeded,)


def _remove_stale_attempt_dirs(job_dir: Path) -> None:
    # We hold the lease, so no live attempt writes here: what is left is a dead attempt's.
    for stale in job_dir.glob(f"{ATTEMPT_DIR_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _resolve_inputs(job: Job, storage: LocalStorage) -> tuple[Path, Path | None]:
    model_path = Path(storage.upload_path(job.model_id))
    dataset_path = Path(storage.upload_path(job.dataset_id)) if job.dataset_id else None
    return model_path, dataset_path


def _logged_progress(lease: LeaseKeeper) -> Callable[[str, float], None]:
    """The core's progress callback: the lease records it; log lines carry the stage."""

    def progress(stage: str, fraction: float) -> None:
        job_context.set_stage(stage)
        lease.progress(stage, fraction)

    return progress


def _uses_gpu(spec: JobSpec) -> bool:
    # Decided without touching CUDA here (the worker forks; only its children may initialise CUDA).
    if spec.device == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return Path("/dev/nvidiactl").exists()


def _child_job(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    dataset_path: Path | None,
    settings: Settings,
    *,
    confined: bool,
    unconfined_code_allowed: bool = False,
    model_format: str | None = None,
) -> ChildJob:
    gpu = _uses_gpu(spec)
    cores = os.cpu_count() or 1
    return ChildJob(
        model_path=model_path,
        dataset_path=dataset_path,
        out_dir=out_dir,
        spec=spec.model_dump(mode="json"),
        confined=confined,
        limits=ChildLimits(
            address_space_bytes=None if gpu else settings.effective_job_memory_bytes,
            # A backstop beside the wall-clock limits the lease enforces: CPU seconds of all threads.
            cpu_seconds=int(settings.job_hard_time_limit * cores) + 60,
            file_bytes=settings.effective_job_file_bytes,
            load_seconds=settings.torchscript_probe_seconds,
        ),
        threads=settings.torch_threads,
        gpu=gpu,
        upload_limits=Limits.from_settings(settings).to_json(),
        unconfined_code_allowed=unconfined_code_allowed,
        model_format=model_format,
    )


def _run_core(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    dataset_path: Path | None,
    lease: LeaseKeeper,
    settings: Settings,
) -> Any:
    from compactor.catalogue import runs_uploaded_code
    from compactor.formats import detect_model_format
    from worker.sandbox import confinement_status, run_in_child

    progress = _logged_progress(lease)
    progress("load", 0.0)
    confined = False
    unconfined_warning: str | None = None
    model_format = detect_model_format(model_path)
    if runs_uploaded_code(model_format):
        # A program: it runs only confined (the child checks its ops before anything runs).
        status = confinement_status(settings.resolved_data_dir)
        if status.available:
            confined = True
        elif settings.allow_unconfined_torchscript:
            unconfined_warning = (
                f"this worker ran the uploaded TorchScript program without kernel confinement ({status.reason}); "
                "COMPACTOR_ALLOW_UNCONFINED_TORCHSCRIPT is set"
            )
            log.warning("job %s: %s", lease.job_id, unconfined_warning)
        else:
            raise ConfinementUnavailable(
                f"this worker cannot confine uploaded TorchScript programs ({status.reason}), so it does not run them; "
                "upload a state_dict or safetensors file with spec.model.arch, or ask the operator to enable Landlock "
                "(or, on a host that runs only trusted models, to set COMPACTOR_ALLOW_UNCONFINED_TORCHSCRIPT=1)"
            )
    job = _child_job(
        model_path,
        spec,
        out_dir,
        dataset_path,
        settings,
        confined=confined,
        unconfined_code_allowed=unconfined_warning is not None,
        model_format=model_format,
    )
    result = run_in_child(job, progress=progress, should_stop=lease.should_cancel)
    log.info("job %s: child started in %.3f s (%s)", lease.job_id, result.seconds_to_start, "confined" if confined else "limits only")
    if unconfined_warning is not None:
        result.metrics.setdefault("warnings", []).append(unconfined_warning)
    return result


def _finish(
    store: JobStore,
    job_id: str,
    owner: str,
    status: JobStatus,
    *,
    error: JobError | None = None,
    metrics: dict[str, Any] | None = None,
    artifacts: list[Artifact] | None = None,
) -> Job | None:
    delay = 0.2
    for attempt in range(1, FINISH_TRIES + 1):
        try:
            return store.finish(job_id, owner, status, error=error, metrics=metrics, artifacts=artifacts)
        except Exception as exc:  # retried; the lease expiry is the last resort
            if attempt == FINISH_TRIES:
                raise
            log.warning("recording %s for job %s failed (%s); retrying", status.value, job_id, exc)
            time.sleep(delay)
            delay *= 2
    return None  # unreachable; keeps type checkers content


def execute_job(
    job_id: str,
    store: JobStore,
    storage: LocalStorage,
    settings: Settings,
    owner: str,
    *,
    shutdown_requested: Callable[[], bool] | None = None,
    on_hard_timeout: Callable[[], None] | None = None,
) -> Outcome:
    """Run one attempt of ``job_id`` as ``owner``; see the module docstring for the outcomes."""
    job = store.claim(job_id, owner, settings.lease_seconds)
    if job is None:
        current = store.get_job(job_id)
        log.info(
            "job %s not claimed (%s); this delivery does nothing",
            job_id,
            "missing" if current is None else f"{current.status.value}, lease owner {current.lease_owner}",
        )
        return Outcome.skipped
    log.info("job %s: attempt %d claimed by %s", job_id, job.attempts, owner)

    lease = LeaseKeeper(
        store,
        job_id,
        owner,
        lease_seconds=settings.lease_seconds,
        # Progress is written at least once a second whatever the heartbeat setting.
        interval=min(settings.heartbeat_seconds, 1.0),
        soft_time_limit=settings.job_soft_time_limit,
        # A little before Celery's own hard limit (prefork pools enforce it by killing the
        # child, which would leave the job to the reaper and a retry): we fail it first.
        hard_time_limit=max(settings.job_soft_time_limit, settings.job_hard_time_limit - HARD_LIMIT_MARGIN_SECONDS),
        shutdown_requested=shutdown_requested,
        on_hard_timeout=on_hard_timeout,
    )
    lease.start()
    try:
        with job_context.job(job_id, job.tenant):
            outcome = _attempt(job, store, storage, owner, lease, settings)
    finally:
        lease.stop()  # idempotent; _attempt stops it earlier on the paths that write
    if outcome is Outcome.finished:
        record_finished_job(store, job_id)
    return outcome


def _make_work_dir(storage: LocalStorage, job_id: str) -> Path:
    job_dir = Path(storage.job_dir(job_id))
    job_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_attempt_dirs(job_dir)
    return Path(tempfile.mkdtemp(prefix=ATTEMPT_DIR_PREFIX, dir=job_dir))


def _attempt(job: Job, store: JobStore, storage: LocalStorage, owner: str, lease: LeaseKeeper, settings: Settings) -> Outcome:
    work_dirs: list[Path] = []
    try:
        return _run_attempt(job, store, storage, owner, lease, work_dirs, settings)
    finally:
        # Whatever happened, the attempt's scratch space goes: artifacts were moved out already.
        for work_dir in work_dirs:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run_attempt(
    job: Job,
    store: JobStore,
    storage: LocalStorage,
    owner: str,
    lease: LeaseKeeper,
    work_dirs: list[Path],
    settings: Settings,
) -> Outcome:
    job_id = job.id
    error: JobError | None = None
    try:
        # Inside the try: a storage failure here must fail the job, not leave it running.
        work_dirs.append(_make_work_dir(storage, job_id))
        spec = parse_spec(job.spec)
        model_path, dataset_path = _resolve_inputs(job, storage)
        result = _run_core(model_path, spec, work_dirs[0], dataset_path, lease, settings)
    except Cancelled:
        reason = lease.reason
        if reason is StopReason.timeout:
            error = JobError(code="timeout", message="the job ran past its time limit and was stopped")
        elif reason is StopReason.shutdown:
            return _hand_back(lease, job_id)
        elif reason is StopReason.lease_lost:
            return Outcome.lost
        else:
            lease.stop()
            _finish(store, job_id, owner, JobStatus.cancelled)
            log.info("job %s cancelled", job_id)
            return Outcome.finished
    except _soft_timeout_types():
        error = JobError(code="timeout", message="the job ran past its time limit and was stopped")
    except CompactorError as exc:
        error = JobError(code=exc.code, message=exc.message)
    except ValidationError as exc:
        # The gateway validated the spec at submission; a stored spec this worker's version
        # cannot read is the client's spec all the same, not an internal error.
        error = JobError(code="invalid_spec", message=f"the stored spec is not valid: {exc.error_count()} error(s)")
    except Exception as exc:  # every failure must end the job, never leave it running
        log.exception("job %s failed unexpectedly", job_id)
        error = JobError(code="internal_error", message=f"an internal error stopped the job ({type(exc).__name__})")

    if lease.lost:
        return Outcome.lost
    if error is not None:
        lease.stop()
        _finish(store, job_id, owner, JobStatus.failed, error=error)
        log.info("job %s failed: %s", job_id, error.code)
        return Outcome.finished

    # Success: move the artifacts into storage (a rename: the attempt dir is inside the job's dir)
    # while the lease is still being renewed, then stop beating and record the outcome.
    try:
        artifacts = [storage.adopt_artifact(job_id, name, Path(path)) for name, path in sorted(result.artifacts.items())]
    except Exception as exc:  # a full or failing disk: fail the job, keep no partial set
        log.exception("job %s: storing the artifacts failed", job_id)
        lease.stop()
        for name in result.artifacts:
            try:
                storage.artifact_path(job_id, name).unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort; the job is failed either way
                log.warning("job %s: could not remove partial artifact %s", job_id, name)
        error = JobError(code="internal_error", message=f"storing the artifacts failed ({type(exc).__name__})")
        _finish(store, job_id, owner, JobStatus.failed, error=error)
        return Outcome.finished
    lease.stop()
    if lease.lost or not lease.renew_now():
        # Another attempt owns the job now; its own artifacts will overwrite ours.
        return Outcome.lost
    recorded = _finish(store, job_id, owner, JobStatus.succeeded, metrics=result.metrics, artifacts=artifacts)
    if recorded is None:
        return Outcome.lost
    log.info("job %s succeeded with %d artifact(s)", job_id, len(artifacts))
    return Outcome.finished


def _hand_back(lease: LeaseKeeper, job_id: str) -> Outcome:
    # The core has returned (it raised Cancelled) and the heartbeat thread is stopped before the
    # store sees the job as queued: from then on another worker may claim it, and this attempt
    # does nothing more, so the two never run at once.
    lease.stop()
    released = lease.release()
    if released is None:
        return Outcome.lost
    if released.status is JobStatus.cancelled:
        log.info("job %s cancelled (its cancel arrived as the worker was stopping)", job_id)
        return Outcome.finished
    log.info("job %s handed back unfinished, attempt not counted: the worker is stopping", job_id)
    return Outcome.interrupted
