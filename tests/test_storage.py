"""LocalStorage on a real directory: streaming uploads, limits, names, atomic artifacts."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactor.storage import InvalidStorageName, LocalStorage, PayloadTooLarge, StorageUnavailable


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


@pytest.fixture()
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def test_an_upload_is_streamed_to_disk_with_its_size_and_sha256(storage: LocalStorage) -> None:
    chunks = [os.urandom(64 * 1024) for _ in range(5)] + [b"", b"tail"]
    consumed: list[int] = []

    def stream() -> Iterator[bytes]:
        for index, chunk in enumerate(chunks):
            consumed.append(index)
            yield chunk

    size, sha256 = storage.save_upload_stream("mdl_abc", stream(), max_bytes=10 * 1024 * 1024)
    whole = b"".join(chunks)
    assert size == len(whole) and sha256 == hashlib.sha256(whole).hexdigest()
    assert consumed == list(range(len(chunks)))
    assert storage.upload_path("mdl_abc").read_bytes() == whole
    assert files_under(storage.root) == [storage.upload_path("mdl_abc")]  # no temporary left over


def test_a_big_upload_written_back_as_it_arrives_is_stored_intact(storage: LocalStorage, monkeypatch) -> None:
    """Past WRITE_BACK_STEP_BYTES the storage advises the kernel to write back and drop what it
    wrote; the file must still hold every byte, in order."""
    import compactor.storage as storage_module

    advised: list[tuple[int, int]] = []
    real = storage_module._FADVISE
    assert real is not None, "posix_fadvise exists on Linux"

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(storage_module, "_FADVISE", recording)
    pieces = [os.urandom(size) for size in (1, 7_000_001, 3, 9_999_999, 65_536, 20_000_000, 12_345)]
    size, sha256 = storage.save_upload_stream("upl_big", iter(pieces), max_bytes=10**9)
    data = b"".join(pieces)
    assert size == len(data) and sha256 == hashlib.sha256(data).hexdigest()
    assert storage.upload_path("upl_big").read_bytes() == data
    # Every step advised the window behind the write position, never past what was written.
    assert len(advised) == 2
    assert all(offset + length <= len(data) and length <= storage_module.WRITE_BACK_WINDOW_BYTES for offset, length in advised)


def test_an_upload_of_exactly_the_limit_is_kept(storage: LocalStorage) -> None:
    size, _ = storage.save_upload_stream("mdl_exact", [b"x" * 600, b"y" * 424], max_bytes=1024)
    assert size == 1024 and storage.upload_path("mdl_exact").stat().st_size == 1024


def test_an_upload_past_the_limit_leaves_nothing_and_stops_reading(storage: LocalStorage) -> None:
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        index = 0
        while True:
            pulled.append(index)
            index += 1
            yield b"z" * 1000

    with pytest.raises(PayloadTooLarge) as raised:
        storage.save_upload_stream("mdl_big", endless(), max_bytes=2500)
    assert raised.value.code == "payload_too_large" and raised.value.status == 413
    assert len(pulled) == 3  # it stopped at the chunk that crossed the limit
    assert not storage.upload_path("mdl_big").exists()
    assert files_under(storage.root) == []


def test_a_stream_that_breaks_midway_leaves_nothing(storage: LocalStorage) -> None:
    def disconnecting() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        storage.save_upload_stream("mdl_cut", disconnecting(), max_bytes=1024)
    assert files_under(storage.root) == []


def test_an_upload_id_is_never_overwritten(storage: LocalStorage) -> None:
    storage.save_upload_stream("mdl_once", [b"first"], max_bytes=100)
    with pytest.raises(FileExistsError):
        storage.save_upload_stream("mdl_once", [b"second"], max_bytes=100)
    assert storage.upload_path("mdl_once").read_bytes() == b"first"


@pytest.mark.parametrize(
    "bad_name",
    ["", "..", ".", "../etc", "a/b", "..hidden", "a..b", ".tmp", "/abs", "a\\b", "x" * 129, "sp ace", "nul\x00", "é"],
)
def test_names_that_could_escape_or_confuse_are_refused(storage: LocalStorage, bad_name: str, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    with pytest.raises(InvalidStorageName):
        storage.upload_path(bad_name)
    with pytest.raises(InvalidStorageName):
        storage.save_upload_stream(bad_name, [b"data"], max_bytes=100)
    with pytest.raises(InvalidStorageName):
        storage.job_dir(bad_name)
    with pytest.raises(InvalidStorageName):
        storage.put_artifact("job_ok", bad_name, source)
    with pytest.raises(InvalidStorageName):
        storage.artifact_path(bad_name, "model.ts")
    assert files_under(tmp_path / "data") == []


def test_a_symlink_that_points_outside_the_root_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (storage.root / "jobs" / "job_evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidStorageName):
        storage.artifact_path("job_evil", "model.ts")


def test_an_artifact_is_put_atomically_with_its_sha256(storage: LocalStorage, tmp_path: Path) -> None:
    source = tmp_path / "work" / "model.ts"
    source.parent.mkdir()
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several copy blocks
    source.write_bytes(payload)

    artifact = storage.put_artifact("job_1", "model.ts", source)
    assert artifact.name == "model.ts" and artifact.size_bytes == len(payload)
    assert artifact.sha256 == hashlib.sha256(payload).hexdigest()
    destination = storage.artifact_path("job_1", "model.ts")
    assert destination == storage.job_dir("job_1") / "model.ts" and destination.read_bytes() == payload
    assert source.exists()  # the caller's file is copied, not taken

    # A retried attempt replaces the artifact in one step: the old inode stays whole for
    # anyone already reading it, new readers get the new file.
    with open(destination, "rb") as reader_of_old_version:
        source.write_bytes(b"second attempt")
        replaced = storage.put_artifact("job_1", "model.ts", source)
        assert reader_of_old_version.read() == payload
    assert destination.read_bytes() == b"second attempt"
    assert replaced.sha256 == hashlib.sha256(b"second attempt").hexdigest()
    assert files_under(storage.root) == [destination]


def test_an_attempts_artifact_is_adopted_by_rename_and_hashed_once(storage: LocalStorage) -> None:
    attempt = storage.job_dir("job_4") / ".attempt-x"
    attempt.mkdir(parents=True)
    source = attempt / "model.ts"
    payload = os.urandom(2 * 1024 * 1024 + 5)
    source.write_bytes(payload)
    inode = source.stat().st_ino

    artifact = storage.adopt_artifact("job_4", "model.ts", source)
    destination = storage.artifact_path("job_4", "model.ts")
    assert artifact.sha256 == hashlib.sha256(payload).hexdigest() and artifact.size_bytes == len(payload)
    assert not source.exists() and destination.stat().st_ino == inode  # moved, not copied


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (tmpfs at /dev/shm)")
def test_an_artifact_on_another_filesystem_is_copied(storage: LocalStorage) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(storage.root).st_dev:
        pytest.skip("/dev/shm is on the data directory's filesystem here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        source = Path(elsewhere) / "report.json"
        source.write_text('{"ok": true}')
        artifact = storage.adopt_artifact("job_5", "report.json", source)
        assert storage.artifact_path("job_5", "report.json").read_text() == '{"ok": true}'
        assert artifact.sha256 == hashlib.sha256(b'{"ok": true}').hexdigest()


def test_a_failed_artifact_copy_leaves_nothing(storage: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        storage.put_artifact("job_2", "model.ts", tmp_path / "missing.ts")
    assert files_under(storage.root) == []


def test_delete_removes_a_job_dir_and_an_upload(storage: LocalStorage, tmp_path: Path) -> None:
    source = tmp_path / "report.json"
    source.write_text("{}")
    storage.put_artifact("job_3", "report.json", source)
    storage.save_upload_stream("dat_1", [b"npz"], max_bytes=100)
    assert storage.delete_job("job_3") is True and not storage.job_dir("job_3").exists()
    assert storage.delete_job("job_3") is False
    assert storage.delete_upload("dat_1") is True and not storage.upload_path("dat_1").exists()
    assert storage.delete_upload("dat_1") is False


def test_sweep_removes_only_old_temporary_files(storage: LocalStorage) -> None:
    leftover = storage.root / "tmp" / ".upload-crashed.part"
    leftover.write_bytes(b"half")
    os.utime(leftover, (1_000_000, 1_000_000))
    fresh = storage.root / "tmp" / ".upload-writing.part"
    fresh.write_bytes(b"in progress")
    assert storage.sweep_temporary(older_than_seconds=3600) == 1
    assert not leftover.exists() and fresh.exists()


def test_ping_tells_a_writable_root_from_one_that_is_gone(storage: LocalStorage) -> None:
    storage.ping()
    assert files_under(storage.root) == []
    (storage.root / "tmp").rmdir()
    with pytest.raises(StorageUnavailable):
        storage.ping()
