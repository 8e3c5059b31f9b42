"""Artifact and upload storage on a local (or shared, mounted) directory.

Layout under ``root``::

    uploads/{upload_id}        uploaded model and dataset files
    jobs/{job_id}/{name}       a job's artifacts
    tmp/                       files being written; renamed into place when complete

Every file is written under ``tmp/`` first and renamed when complete and
flushed, so a reader sees either nothing or the whole file, and a crash leaves
only a temporary file behind (``sweep_temporary`` removes old ones). ``tmp/`` is
inside ``root`` so the rename never crosses file systems.

Names are server-made IDs and fixed artifact names, checked against
``^[A-Za-z0-9_.-]{1,128}$`` (no ``..``, no leading dot); every resolved path is
checked to stay under ``root``. An object store can implement the same methods.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from compactor.errors import CompactorError
from compactor.jobs import Artifact

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_COPY_BLOCK_BYTES = 1024 * 1024


class PayloadTooLarge(CompactorError):
    code = "payload_too_large"
    status = 413


class InvalidStorageName(ValueError):
    """An id or artifact name that is not a plain, safe file name."""


class StorageUnavailable(Exception):
    """The storage directory cannot be written (gateway answers 503)."""


def check_storage_name(name: str) -> str:
    # A leading dot is refused too: dot-names are how temporary and hidden files look.
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or ".." in name or name.startswith("."):
        raise InvalidStorageName(f"{name!r} is not a valid storage name (letters, digits, '_', '.', '-'; at most 128)")
    return name


# Big uploads are pushed to disk as they arrive and dropped from the page cache once written:
# left to the kernel, every GiB uploaded stays cached and dirty until the final fsync, and
# once uploads have filled the cache each new page costs the gateway reclaim work in the
# kernel (measured: system time per GiB 0.7 s for the first upload, 3.1 s for the fourth in a
# row; user time stays 1.25 s). Uploads are read once, later, by a worker.
WRITE_BACK_STEP_BYTES = 16 * 1024 * 1024
# Each step re-advises this much behind the write position: the pages an earlier step sent to
# disk are clean by now, so this call drops them (dirty ones it starts writing instead).
WRITE_BACK_WINDOW_BYTES = 4 * WRITE_BACK_STEP_BYTES
_FADVISE = getattr(os, "posix_fadvise", None)


def _write_back_and_forget(stream: BinaryIO, end: int) -> int:
    """POSIX_FADV_DONTNEED on the last window before ``end``: on Linux it starts write-back of
    the dirty pages (without waiting) and drops the clean ones. Advice only: the final fsync
    still makes the file durable. Returns ``end``."""
    if _FADVISE is not None:
        stream.flush()
        start = max(0, end - WRITE_BACK_WINDOW_BYTES)
        with contextlib.suppress(OSError):
            _FADVISE(stream.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
    return end


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._uploads = self.root / "uploads"
        self._jobs = self.root / "jobs"
        self._temporary = self.root / "tmp"
        for directory in (self._uploads, self._jobs, self._temporary):
            directory.mkdir(parents=True, exist_ok=True)

    # -- paths

    def _inside_root(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise InvalidStorageName(f"{path} leaves the storage directory")
        return resolved

    def upload_path(self, upload_id: str) -> Path:
        return self._inside_root(self._uploads / check_storage_name(upload_id))

    def job_dir(self, job_id: str) -> Path:
        return self._inside_root(self._jobs / check_storage_name(job_id))

    def artifact_path(self, job_id: str, name: str) -> Path:
        return self._inside_root(self.job_dir(job_id) / check_storage_name(name))

    # -- writing

    def _temporary_file(self, purpose: str) -> tuple[BinaryIO, Path]:
        descriptor, name = tempfile.mkstemp(prefix=f".{purpose}-", suffix=".part", dir=self._temporary)
        return os.fdopen(descriptor, "wb"), Path(name)

    @staticmethod
    def _publish(temporary: Path, final: Path) -> None:
        """Atomically rename a complete, flushed file into place, and make the rename durable."""
        os.replace(temporary, final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def save_upload_stream(self, upload_id: str, chunks: Iterable[bytes], max_bytes: int) -> tuple[int, str]:
        """Stream ``chunks`` into the upload's file; returns (size in bytes, sha256 hex).

        Past ``max_bytes`` raises ``PayloadTooLarge`` and keeps nothing; any other failure
        (a client that disconnects mid-stream) keeps nothing either."""
        final = self.upload_path(upload_id)
        if final.exists():
            raise FileExistsError(f"upload {upload_id} is already stored")
        digest = hashlib.sha256()
        size = 0
        stream, temporary = self._temporary_file(f"upload-{upload_id}")
        try:
            with stream:
                advised = 0
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    stream.write(chunk)
                    if size - advised >= WRITE_BACK_STEP_BYTES:
                        advised = _write_back_and_forget(stream, size)
                stream.flush()
                os.fsync(stream.fileno())
            self._publish(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def put_artifact(self, job_id: str, name: str, source_path: Path) -> Artifact:
        """Copy ``source_path`` in as the job's artifact ``name`` (replacing an earlier one
        atomically), hashing what was actually written."""
        final = self.artifact_path(job_id, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        stream, temporary = self._temporary_file(f"artifact-{job_id}-{name}")
        try:
            with stream, open(source_path, "rb") as source:
                while block := source.read(_COPY_BLOCK_BYTES):
                    digest.update(block)
                    stream.write(block)
                    size += len(block)
                stream.flush()
                os.fsync(stream.fileno())
            self._publish(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return Artifact(name=name, size_bytes=size, sha256=digest.hexdigest())

    def adopt_artifact(self, job_id: str, name: str, source_path: Path) -> Artifact:
        """Move a finished file in as the job's artifact ``name``: hashed once (and flushed) in
        place, then renamed; a copy only when ``source_path`` is on another filesystem.

        The hash is this process's, never the job's child's: the child may have run uploaded code.
        """
        final = self.artifact_path(job_id, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with open(source_path, "rb") as source:
            while block := source.read(_COPY_BLOCK_BYTES):
                digest.update(block)
                size += len(block)
            os.fsync(source.fileno())
        try:
            self._publish(Path(source_path), final)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            return self.put_artifact(job_id, name, source_path)
        return Artifact(name=name, size_bytes=size, sha256=digest.hexdigest())

    # -- deleting

    def delete_job(self, job_id: str) -> bool:
        directory = self.job_dir(job_id)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True

    def delete_upload(self, upload_id: str) -> bool:
        path = self.upload_path(upload_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def sweep_temporary(self, older_than_seconds: float) -> int:
        """Remove temporary files a crashed writer left behind; returns how many."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for leftover in self._temporary.iterdir():
            try:
                if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- health

    def ping(self) -> None:
        """Raise StorageUnavailable unless a file can be created, written and removed."""
        try:
            stream, probe = self._temporary_file("ping")
            try:
                with stream:
                    stream.write(b"ok")
            finally:
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"the storage directory {self.root} is not writable: {exc}") from exc
