"""Submission: uploads and jobs are validated completely before anything is created or enqueued.

These functions are synchronous and run in a worker thread (they stream the body,
hash, detect formats and talk to the store and the broker). Whatever a failed
request stored — files and upload records — is deleted before the error propagates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from starlette.requests import Request

from compactor.compat import DatasetFacts, check_compatibility
from compactor.errors import InvalidDataset
from compactor.formats import dataset_info, detect_model_format, inspect_dataset
from compactor.jobs import Job, JobStatus, Upload, new_id
from compactor.limits import Limits
from compactor.queue import BrokerUnavailable, JobQueue
from compactor.settings import Settings
from compactor.spec import JobSpec, parse_spec
from compactor.storage import LocalStorage
from compactor.store.base import JobStore
from compactor.torchscript_code import check_torchscript_code
from compactor.webhooks import WebhookConfigError, check_notify_url
from service.deps import valid_id
from service.errors import RETRY_AFTER_SECONDS, ApiError, not_found
from service.metrics import record_upload
from service.schemas import JobRequest
from service.uploads import Part, multipart_parts, request_budget, store_file_part

log = logging.getLogger("service.intake")

UploadKind = Literal["model", "dataset"]
_PREFIX: dict[str, str] = {"model": "mdl", "dataset": "dst"}


@dataclass
class _Cleanup:
    """What this request stored; undone unless ``keep()`` is called."""

    storage: LocalStorage
    store: JobStore
    tenant: str
    files: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)

    def undo(self) -> None:
        for upload_id in self.records:
            try:
                self.store.delete_upload(upload_id, self.tenant)
            except Exception:  # best effort; the original error matters more
                log.exception("could not delete upload record %s", upload_id)
        for upload_id in self.files:
            try:
                self.storage.delete_upload(upload_id)
            except Exception:
                log.exception("could not delete upload file %s", upload_id)
        self.records.clear()
        self.files.clear()


def _missing(name: str) -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        f"the form part {name!r} is required",
        errors=[{"loc": ["body", name], "msg": "Field required"}],
    )


def _unexpected(part: Part, allowed: tuple[str, ...]) -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        f"unexpected form part {part.name!r}; this endpoint takes {', '.join(allowed)}",
        errors=[{"loc": ["body", part.name], "msg": "unexpected form part"}],
    )


def _needs_file(part: Part) -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        f"form part {part.name!r} must be a file (Content-Disposition with a filename)",
        errors=[{"loc": ["body", part.name], "msg": "expected a file"}],
    )


def _save(storage: LocalStorage, cleanup: _Cleanup, part: Part, kind: UploadKind, settings: Settings) -> tuple[str, int, str]:
    upload_id = new_id(_PREFIX[kind])
    cleanup.files.append(upload_id)
    stored = store_file_part(storage, part, upload_id, settings.max_upload_bytes)
    record_upload(kind, stored.size_bytes)
    return upload_id, stored.size_bytes, stored.sha256


def _describe(
    storage: LocalStorage, kind: UploadKind, upload_id: str, size: int, sha256: str, tenant: str, limits: Limits
) -> tuple[Upload, DatasetFacts | None]:
    """Detect the format from the stored bytes (and count samples) within ``limits``, the same the
    worker loads with; raises compactor errors."""
    path = storage.upload_path(upload_id)
    if kind == "model":
        fmt = detect_model_format(path, limits.model_archive)
        if fmt == "torchscript":
            # A program: an op off the allowlist is refused now (422 unsafe_model, naming it),
            # not after the job has waited in the queue; the worker checks the graph again.
            check_torchscript_code(path)
        return Upload(id=upload_id, tenant=tenant, kind="model", format=fmt, size_bytes=size, sha256=sha256), None
    dfmt, info = inspect_dataset(path, limits.dataset_archive)
    elements = math.prod(info.input_shape)
    if elements > limits.max_dataset_input_elements:
        raise InvalidDataset(
            f"'inputs' has {elements:,} elements, more than the limit of {limits.max_dataset_input_elements:,} "
            "(COMPACTOR_MAX_DATASET_BYTES / 4, as float32): upload fewer or smaller samples"
        )
    upload = Upload(
        id=upload_id,
        tenant=tenant,
        kind="dataset",
        format=dfmt,
        size_bytes=size,
        sha256=sha256,
        num_samples=info.num_samples,
        has_targets=info.has_targets,
        input_shape=list(info.input_shape),
    )
    return upload, _dataset_facts(storage, upload)


def _dataset_facts(storage: LocalStorage, upload: Upload) -> DatasetFacts:
    """What the compatibility check needs of a dataset: from its record (inspected at upload),
    or, for a record older than that, from one more look at the file."""
    if upload.num_samples is not None and upload.has_targets is not None:
        return DatasetFacts(format=upload.format, num_samples=upload.num_samples, has_targets=upload.has_targets)
    info = dataset_info(storage.upload_path(upload.id), upload.format)
    return DatasetFacts(format=upload.format, num_samples=info.num_samples, has_targets=info.has_targets)


def receive_upload(request: Request, kind: UploadKind, *, settings: Settings, storage: LocalStorage, store: JobStore, tenant: str) -> Upload:
    """``POST /v1/models`` and ``/v1/datasets``: one multipart part ``file``."""
    cleanup = _Cleanup(storage, store, tenant)
    try:
        saved: tuple[str, int, str] | None = None
        for part in multipart_parts(request, request_budget(settings.max_upload_bytes)):
            if part.name != "file" or saved is not None:
                raise _unexpected(part, ("one 'file'",))
            if not part.is_file:
                raise _needs_file(part)
            saved = _save(storage, cleanup, part, kind, settings)
        if saved is None:
            raise _missing("file")
        upload, _facts = _describe(storage, kind, *saved, tenant, Limits.from_settings(settings))
        store.put_upload(upload)
        cleanup.records.append(upload.id)
        return upload
    except BaseException:
        cleanup.undo()
        raise


def _check_notify(spec: JobSpec, settings: Settings, tenant: str) -> None:
    """Refuse a webhook this server would not send (``422 invalid_spec`` at ``spec.notify.url``:
    host off the operator's allowlist, or no signing secret for the tenant) before anything exists."""
    if spec.notify is None:
        return
    try:
        check_notify_url(spec.notify.url, settings, tenant)
    except WebhookConfigError as exc:
        log.error("webhook configuration: %s", exc)
        raise ApiError(
            503,
            "webhooks_unavailable",
            "the server's webhook configuration cannot be read; retry shortly, or submit without spec.notify",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None


@dataclass
class Submitted:
    job: Job
    created: bool  # False: an earlier job with the same Idempotency-Key was returned


def _create_and_enqueue(
    store: JobStore,
    queue: JobQueue,
    cleanup: _Cleanup,
    settings: Settings,
    *,
    spec: JobSpec,
    model_id: str,
    dataset_id: str | None,
    idempotency_key: str | None,
) -> Submitted:
    job = Job(
        id=new_id("job"),
        tenant=cleanup.tenant,
        spec=spec.model_dump(mode="json"),
        model_id=model_id,
        dataset_id=dataset_id,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
    )
    stored = store.create_job(job)
    if stored.id != job.id:
        # A retry of an earlier request: that job stands, this request's uploads go.
        cleanup.undo()
        if stored.status is JobStatus.queued and stored.attempts == 0:
            # The first request may have died between storing the job and enqueueing it (the
            # client retried because it got no answer): send it again. A second message for a
            # job is harmless — the claim lets only one attempt run.
            queue.enqueue(stored.id, attempt=1)
        return Submitted(stored, created=False)
    try:
        queue.enqueue(stored.id, attempt=1)
    except BrokerUnavailable:
        # Never leave a queued job nobody will run: remove it and what came with it.
        try:
            store.delete_job(stored.id, cleanup.tenant)
        except Exception:
            log.exception("could not remove job %s after the broker refused it", stored.id)
        raise
    return Submitted(stored, created=True)


def submit_multipart(
    request: Request,
    *,
    settings: Settings,
    storage: LocalStorage,
    store: JobStore,
    queue: JobQueue,
    tenant: str,
    idempotency_key: str | None,
) -> Submitted:
    """``POST /v1/jobs`` as multipart: parts ``model`` (file), ``dataset`` (file), ``spec`` (JSON text)."""
    cleanup = _Cleanup(storage, store, tenant)
    allowed = ("'model' (file)", "'dataset' (file)", "'spec' (JSON)")
    try:
        model: tuple[str, int, str] | None = None
        dataset: tuple[str, int, str] | None = None
        spec_text: str | None = None
        for part in multipart_parts(request, request_budget(settings.max_upload_bytes)):
            if part.name == "model" and model is None:
                if not part.is_file:
                    raise _needs_file(part)
                model = _save(storage, cleanup, part, "model", settings)
            elif part.name == "dataset" and dataset is None:
                if not part.is_file:
                    raise _needs_file(part)
                dataset = _save(storage, cleanup, part, "dataset", settings)
            elif part.name == "spec" and spec_text is None:
                spec_text = part.read_text()
            else:
                raise _unexpected(part, allowed)
        if model is None:
            raise _missing("model")
        spec = parse_spec(spec_text)  # pydantic.ValidationError → 422 invalid_spec (loc under "spec")
        _check_notify(spec, settings, tenant)
        limits = Limits.from_settings(settings)
        model_upload, _ = _describe(storage, "model", *model, tenant, limits)
        dataset_upload, facts = _describe(storage, "dataset", *dataset, tenant, limits) if dataset else (None, None)
        check_compatibility(model_upload.format, spec, facts)
        for upload in (model_upload, dataset_upload):
            if upload is not None:
                store.put_upload(upload)
                cleanup.records.append(upload.id)
        return _create_and_enqueue(
            store,
            queue,
            cleanup,
            settings,
            spec=spec,
            model_id=model_upload.id,
            dataset_id=dataset_upload.id if dataset_upload else None,
            idempotency_key=idempotency_key,
        )
    except BaseException:
        cleanup.undo()
        raise


def submit_json(
    body: bytes,
    *,
    settings: Settings,
    storage: LocalStorage,
    store: JobStore,
    queue: JobQueue,
    tenant: str,
    idempotency_key: str | None,
) -> Submitted:
    """``POST /v1/jobs`` as JSON: a spec that names ``model_id`` (and ``dataset_id``) of earlier uploads."""
    request = JobRequest.model_validate_json(body or b"{}")
    spec = request.to_spec()
    _check_notify(spec, settings, tenant)
    model = store.get_upload(valid_id(request.model_id, "model"), tenant)
    if model is None or model.kind != "model":
        raise not_found("model")
    facts: DatasetFacts | None = None
    if request.dataset_id is not None:
        dataset = store.get_upload(valid_id(request.dataset_id, "dataset"), tenant)
        if dataset is None or dataset.kind != "dataset":
            raise not_found("dataset")
        facts = _dataset_facts(storage, dataset)
    check_compatibility(model.format, spec, facts)
    # Nothing was stored by this request: a failure has nothing to undo.
    cleanup = _Cleanup(storage, store, tenant)
    return _create_and_enqueue(
        store,
        queue,
        cleanup,
        settings,
        spec=spec,
        model_id=model.id,
        dataset_id=request.dataset_id,
        idempotency_key=idempotency_key,
    )


def revoke_attempts(job: Job) -> int:
    """How many task ids (``<id>-1`` … ``<id>-n``) a queued job may have had sent."""
    return max(job.attempts, 0) + 1


__all__ = ["Submitted", "receive_upload", "revoke_attempts", "submit_json", "submit_multipart", "JobStatus"]
