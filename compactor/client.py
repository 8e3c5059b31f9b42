"""A small Python client for the Compactor HTTP API (``/v1``).

    from compactor.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("model.ts", dataset="data.pt", spec={"quantize": {"mode": "dynamic"}})
        job = client.wait(job["id"], raise_on_failure=True)
        client.download_all(job["id"], "out/")

Jobs, uploads and lists are returned as the plain JSON documents the API
answers (``dict``), so the client never lags behind new optional fields.

It depends on httpx only and never imports torch: it runs on machines that only
ship files to the service. Uploads are streamed from disk in chunks and
downloads are streamed to disk, so memory stays flat for multi-GiB files.

Exceptions (all importable from this module)::

    CompactorClientError          base of everything this client raises on purpose
    ├── TransportError            the server could not be reached or the connection broke
    │                             (connection refused, DNS, timeouts); wraps the httpx error
    ├── ApiError                  the server answered with an error (RFC 9457 problem details):
    │   │                         .status, .code, .title, .detail, .errors, .problem (whole body)
    │   ├── InvalidRequest        400, 415, 422: the request or spec was refused; .errors says where
    │   ├── Unauthorized          401: missing or wrong API key
    │   ├── NotFound              404: unknown id (or another tenant's: the API never says 403)
    │   ├── Conflict              409
    │   │   └── JobNotFinished    409 job_not_finished: artifacts exist only once a job succeeded
    │   ├── PayloadTooLarge       413: upload past the server's size limit
    │   └── ServerError           5xx
    │       └── ServiceUnavailable  503: store, broker or storage down; .retry_after seconds
    ├── ChecksumMismatch          a download's bytes do not match the ETag sha256 (nothing kept)
    ├── WaitTimeout               wait(..., timeout=) ran out; .job is the last document seen
    └── JobFailed                 wait(..., raise_on_failure=True) saw failed or cancelled; .job
        └── JobCancelled          ... the job was cancelled

Local mistakes (a model path that does not exist, a spec string that is
neither JSON nor a file) raise the usual ``FileNotFoundError`` / ``ValueError``
before anything is sent.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

__all__ = [
    "ApiError",
    "ChecksumMismatch",
    "Client",
    "CompactorClientError",
    "Conflict",
    "InvalidRequest",
    "JobCancelled",
    "JobFailed",
    "JobNotFinished",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "TERMINAL_STATUSES",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Big enough that per-chunk overhead is negligible, small enough that progress moves smoothly.
CHUNK_BYTES = 1024 * 1024
# Connecting should be quick; reading may wait while the server validates a large upload.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
# Matches the server's artifact name rule; anything else must never become a local path.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

PathLike = str | os.PathLike[str]
ProgressCallback = Callable[[int, int], None]
JobCallback = Callable[[dict[str, Any]], None]


# -- exceptions (the tree is documented once, in the module docstring)


class CompactorClientError(Exception):
    """Base of every error this client raises on purpose."""


class TransportError(CompactorClientError):
    """The server could not be reached, or the connection failed mid-request."""


class ApiError(CompactorClientError):
    """The server answered with an error status; the fields come from its problem JSON."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.problem = problem or {}


class InvalidRequest(ApiError):
    """400 / 415 / 422: the server refused the request or the spec."""


class Unauthorized(ApiError):
    """401: missing or wrong API key."""


class NotFound(ApiError):
    """404: no such job, upload, artifact or route for this tenant."""


class Conflict(ApiError):
    """409: the resource is not in a state that allows this."""


class JobNotFinished(Conflict):
    """409 ``job_not_finished``: artifacts can be downloaded once the job has succeeded."""


class PayloadTooLarge(ApiError):
    """413: the upload is past the server's limit."""


class ServerError(ApiError):
    """5xx."""


class ServiceUnavailable(ServerError):
    """503: a backing service is down; retry after ``retry_after`` seconds."""

    retry_after: float | None = None


class ChecksumMismatch(CompactorClientError):
    """A downloaded file's sha256 differs from the one the server recorded."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 mismatch (expected {expected}, got {actual}); the file was not kept")
        self.name = name
        self.expected = expected
        self.actual = actual


class WaitTimeout(CompactorClientError):
    """``wait`` gave up before the job reached a terminal status."""

    def __init__(self, job: dict[str, Any], timeout: float) -> None:
        super().__init__(f"job {job.get('id')} is still {job.get('status')} after {timeout:g} s")
        self.job = job


class JobFailed(CompactorClientError):
    """The job ended failed (or cancelled, see ``JobCancelled``); ``job`` is its document."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        super().__init__(f"job {job.get('id')} {job.get('status')}{reason}")
        self.job = job
        self.status: str = job.get("status", "")
        self.error: dict[str, Any] = error


class JobCancelled(JobFailed):
    """The job was cancelled."""


def _error_class(status: int, code: str) -> type[ApiError]:
    if status == 409:
        return JobNotFinished if code == "job_not_finished" else Conflict
    if status == 503:
        return ServiceUnavailable
    if status >= 500:
        return ServerError
    return {
        400: InvalidRequest,
        401: Unauthorized,
        404: NotFound,
        413: PayloadTooLarge,
        415: InvalidRequest,
        422: InvalidRequest,
    }.get(status, ApiError)


def api_error_from_response(response: httpx.Response) -> ApiError:
    """The right ``ApiError`` subclass for an error response (problem JSON or not)."""
    problem: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict):
            problem = body
    except (ValueError, UnicodeDecodeError):
        # A proxy's HTML page or an empty body: fall back to the status line.
        pass
    status = response.status_code
    code = str(problem.get("code") or f"http_{status}")
    title = str(problem.get("title") or response.reason_phrase or "Error")
    detail = str(problem.get("detail") or response.text[:500].strip() or title)
    errors = problem.get("errors") if isinstance(problem.get("errors"), list) else None
    error = _error_class(status, code)(status, code, title, detail, errors, problem)
    if isinstance(error, ServiceUnavailable):
        try:
            error.retry_after = float(response.headers.get("Retry-After", ""))
        except ValueError:
            error.retry_after = None
    return error


# -- streamed multipart bodies


def _header_safe(name: str) -> str:
    # The server never uses client file names as paths; keep the header plain ASCII and unambiguous.
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name) or "upload"


class _Part:
    """One multipart part: either in-memory text (the spec) or a file streamed from disk."""

    def __init__(self, name: str, *, path: Path | None = None, text: str | None = None) -> None:
        self.name = name
        self.path = path
        self.data = text.encode("utf-8") if text is not None else b""
        self.size = path.stat().st_size if path is not None else len(self.data)
        if path is not None:
            self.header = (
                f'Content-Disposition: form-data; name="{name}"; filename="{_header_safe(path.name)}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode("ascii")
        else:
            self.header = (f'Content-Disposition: form-data; name="{name}"\r\nContent-Type: application/json\r\n\r\n').encode("ascii")


class _MultipartBody:
    """A multipart/form-data body produced chunk by chunk from files on disk.

    The length is known up front so the request carries ``Content-Length`` (the
    server refuses an oversized upload before reading it) instead of chunked
    encoding. Progress counts file bytes only, so ``total`` is what users recognise.
    """

    def __init__(self, parts: list[_Part], on_progress: ProgressCallback | None) -> None:
        self.parts = parts
        self.boundary = f"compactor-{secrets.token_hex(16)}"
        self.on_progress = on_progress
        self.file_total = sum(p.size for p in parts if p.path is not None)
        self.length = sum(len(self._opening(p)) + p.size + 2 for p in parts) + len(self._closing())

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _opening(self, part: _Part) -> bytes:
        return f"--{self.boundary}\r\n".encode("ascii") + part.header

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        if self.on_progress is not None:
            self.on_progress(0, self.file_total)
        for part in self.parts:
            yield self._opening(part)
            if part.path is None:
                yield part.data
            else:
                remaining = part.size
                with open(part.path, "rb") as stream:
                    while remaining > 0:
                        chunk = stream.read(min(CHUNK_BYTES, remaining))
                        if not chunk:
                            # Content-Length is already on the wire; a shrinking file cannot be sent honestly.
                            raise CompactorClientError(f"{part.path} changed size while it was being uploaded")
                        remaining -= len(chunk)
                        sent += len(chunk)
                        yield chunk
                        if self.on_progress is not None:
                            self.on_progress(sent, self.file_total)
            yield b"\r\n"
        yield self._closing()


def _existing_file(path: PathLike, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} file not found: {resolved}")
    return resolved


def _spec_text(spec: Mapping[str, Any] | str | os.PathLike[str] | None) -> str | None:
    """The spec as JSON text. A str is JSON when it looks like an object, else a file path."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return json.dumps(dict(spec))
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        text = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"spec is neither a JSON object nor an existing file: {spec!s}")
        text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("spec must be a JSON object")
    return text


def _spec_dict(spec: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    text = _spec_text(spec)
    return {} if text is None else json.loads(text)


def _etag_sha256(etag: str | None) -> str | None:
    if not etag:
        return None
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"').lower()
    return value if _SHA256.match(value) else None


def _safe_artifact_name(name: str) -> str:
    # Names come from the server; never let one climb out of the output directory.
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"unsafe artifact name: {name!r}")
    return name


# -- the client


class Client:
    """A synchronous client for one Compactor server. Use as a context manager, or call ``close()``.

    ``url`` defaults to ``$COMPACTOR_URL`` (else ``http://127.0.0.1:8000``) and
    ``api_key`` to ``$COMPACTOR_API_KEY`` (none: the server's open mode).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("COMPACTOR_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("COMPACTOR_API_KEY")
        headers = {"User-Agent": "compactor-client/0.1", "Accept": "application/json, application/problem+json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # transport: lets tests and embedders route requests in memory (httpx.MockTransport / ASGITransport).
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    # -- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"cannot reach {self.url}: {str(exc) or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise api_error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "invalid_response", "Invalid response", "the server's answer is not JSON") from exc

    @staticmethod
    def _job_path(job_id: str) -> str:
        if not job_id:
            raise ValueError("job id must not be empty")
        # Ids are opaque: quote them so no id can reach another path.
        return f"/v1/jobs/{quote(job_id, safe='')}"

    def _multipart(self, path: str, parts: builtins.list[_Part], on_progress: ProgressCallback | None, headers: dict[str, str] | None = None) -> Any:
        body = _MultipartBody(parts, on_progress)
        request_headers = {"Content-Type": body.content_type, "Content-Length": str(body.length), **(headers or {})}
        return self._json("POST", path, content=iter(body), headers=request_headers)

    # -- uploads and submission

    def submit(
        self,
        model: PathLike,
        *,
        dataset: PathLike | None = None,
        spec: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        idempotency_key: str | None = None,
        on_upload_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Upload a model (and dataset) and create a job in one request; returns the queued job.

        ``spec`` is a dict, JSON text, or the path of a JSON file. ``idempotency_key``
        makes a retried submission return the job the first one created.
        ``on_upload_progress(sent_bytes, total_bytes)`` is called as file bytes go out.
        """
        parts = [_Part("model", path=_existing_file(model, "model"))]
        if dataset is not None:
            parts.append(_Part("dataset", path=_existing_file(dataset, "dataset")))
        text = _spec_text(spec)
        if text is not None:
            parts.append(_Part("spec", text=text))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._multipart("/v1/jobs", parts, on_upload_progress, headers)  # type: ignore[no-any-return]

    def upload_model(self, path: PathLike, *, on_upload_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Upload a model once, to reuse in many jobs: ``{"id", "format", "size_bytes", "sha256"}``."""
        parts = [_Part("file", path=_existing_file(path, "model"))]
        return self._multipart("/v1/models", parts, on_upload_progress)  # type: ignore[no-any-return]

    def upload_dataset(self, path: PathLike, *, on_upload_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Upload a dataset once: ``{"id", "format", "num_samples", "size_bytes", "sha256"}``."""
        parts = [_Part("file", path=_existing_file(path, "dataset"))]
        return self._multipart("/v1/datasets", parts, on_upload_progress)  # type: ignore[no-any-return]

    def submit_ids(
        self,
        model_id: str,
        dataset_id: str | None = None,
        spec: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a job from earlier uploads (the application/json form of ``POST /v1/jobs``)."""
        body = _spec_dict(spec)
        body["model_id"] = model_id
        if dataset_id is not None:
            body["dataset_id"] = dataset_id
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    # -- jobs

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", self._job_path(job_id))  # type: ignore[no-any-return]

    def list(self, status: str | None = None, limit: int | None = None, *, page_size: int = 50) -> Iterator[dict[str, Any]]:
        """The tenant's jobs, newest first, following ``next_cursor`` page by page.

        ``limit`` caps the number of jobs yielded (None: all of them); pages are
        fetched lazily, so stopping early costs no further requests.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        remaining = limit
        cursor: str | None = None
        while remaining is None or remaining > 0:
            params: dict[str, Any] = {"limit": min(page_size, remaining) if remaining is not None else page_size}
            if status is not None:
                params["status"] = status
            if cursor is not None:
                params["cursor"] = cursor
            page = self._json("GET", "/v1/jobs", params=params)
            for item in page.get("items", []):
                if remaining is not None:
                    if remaining <= 0:
                        return
                    remaining -= 1
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        return self._json("POST", f"{self._job_path(job_id)}/cancel")  # type: ignore[no-any-return]

    def delete(self, job_id: str) -> None:
        """Cancel if needed, then delete the job and its artifacts."""
        self._request("DELETE", self._job_path(job_id))

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_progress: JobCallback | None = None,
        raise_on_failure: bool = False,
        max_transient_errors: int = 5,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; return its final document.

        ``on_progress(job)`` is called for the first document and whenever status,
        stage or progress changes. ``timeout`` (seconds) raises ``WaitTimeout``.
        With ``raise_on_failure`` a failed job raises ``JobFailed`` and a cancelled
        one ``JobCancelled``. Up to ``max_transient_errors`` consecutive connection
        errors or 503s are ridden out (a gateway restart must not lose a long wait).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        transient = 0
        job: dict[str, Any] | None = None
        while True:
            try:
                job = self.get(job_id)
                transient = 0
            except (TransportError, ServiceUnavailable):
                transient += 1
                if transient > max_transient_errors:
                    raise
            if job is not None:
                state = (job.get("status"), job.get("stage"), job.get("progress"))
                if state != seen:
                    seen = state
                    if on_progress is not None:
                        on_progress(job)
                if job.get("status") in TERMINAL_STATUSES:
                    if raise_on_failure and job["status"] == "failed":
                        raise JobFailed(job)
                    if raise_on_failure and job["status"] == "cancelled":
                        raise JobCancelled(job)
                    return job
            delay = poll_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(job or {"id": job_id, "status": "unknown"}, timeout or 0.0)
                delay = min(delay, left)
            time.sleep(delay)

    # -- artifacts

    def download(self, job_id: str, name: str, dest: PathLike, *, on_progress: ProgressCallback | None = None) -> Path:
        """Stream artifact ``name`` to ``dest`` (a file path, or an existing directory to put it in).

        The bytes go to a temporary file next to ``dest``, are checked against the
        ``ETag`` sha256, and only then renamed into place: ``dest`` is never left
        half-written or wrong. A mismatch raises ``ChecksumMismatch``.
        """
        name = _safe_artifact_name(name)
        target = Path(dest).expanduser()
        if target.is_dir():
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{self._job_path(job_id)}/artifacts/{quote(name, safe='')}"
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code >= 400:
                    response.read()
                    raise api_error_from_response(response)
                expected = _etag_sha256(response.headers.get("ETag"))
                if expected is None:
                    # No usable ETag (a proxy stripped it?): the job document records the same hash.
                    expected = self._recorded_sha256(job_id, name)
                total = int(response.headers.get("Content-Length") or 0)
                return self._stream_to(target, response, total, on_progress, expected, name)
        except httpx.TransportError as exc:
            raise TransportError(f"download of {name} from {self.url} failed: {str(exc) or type(exc).__name__}") from exc

    def _recorded_sha256(self, job_id: str, name: str) -> str:
        for artifact in self.get(job_id).get("artifacts", []):
            if artifact.get("name") == name and _SHA256.match(str(artifact.get("sha256", ""))):
                return str(artifact["sha256"])
        raise CompactorClientError(f"the server gave no sha256 for {name}; refusing an unverifiable download")

    @staticmethod
    def _stream_to(
        target: Path,
        response: httpx.Response,
        total: int,
        on_progress: ProgressCallback | None,
        expected: str,
        name: str,
    ) -> Path:
        digest = hashlib.sha256()
        received = 0
        handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        temporary = Path(temporary_name)
        try:
            stream: BinaryIO
            with os.fdopen(handle, "wb") as stream:
                if on_progress is not None:
                    on_progress(0, total)
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    stream.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if on_progress is not None:
                        on_progress(received, total)
                stream.flush()
                os.fsync(stream.fileno())
            actual = digest.hexdigest()
            if actual != expected:
                raise ChecksumMismatch(name, expected, actual)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return target

    def download_all(self, job_id: str, out_dir: PathLike, *, on_progress: Callable[[str, int, int], None] | None = None) -> builtins.list[Path]:
        """Download every artifact of a succeeded job into ``out_dir``; returns the paths."""
        directory = Path(out_dir).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        job = self.get(job_id)
        if job.get("status") != "succeeded":
            raise JobNotFinished(
                409,
                "job_not_finished",
                "Conflict",
                f"the job is {job.get('status')}; artifacts can be downloaded once it has succeeded",
            )
        paths: builtins.list[Path] = []
        for artifact in job.get("artifacts", []):
            name = str(artifact["name"])
            callback = None if on_progress is None else (lambda sent, total, _n=name: on_progress(_n, sent, total))
            paths.append(self.download(job_id, name, directory / _safe_artifact_name(name), on_progress=callback))
        return paths
