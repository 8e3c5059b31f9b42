"""Zip archives checked before anything reads them: entry names, sizes, ratios, overlaps."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath

from compactor.errors import CompactorError, InvalidModel
from compactor.formats.limits import ArchiveLimits


def check_zip_archive(
    archive: zipfile.ZipFile,
    limits: ArchiveLimits,
    *,
    file_size: int,
    single_prefix: bool,
    error: type[CompactorError] = InvalidModel,
) -> str | None:
    """Validate a zip's central directory before any entry is read.

    Checks the entry count, declared uncompressed sizes against the byte
    budget, per-entry compression ratio, overlapping or out-of-file entries,
    encryption and compression methods, names (no absolute paths, no ``..``,
    no backslashes, no duplicates) and, with ``single_prefix``, that every
    entry lies under one top-level folder as torch writes it. Returns that
    prefix (or None). Raises ``error`` (InvalidModel or InvalidDataset).
    """
    entries = archive.infolist()
    if not entries:
        raise error("the zip archive is empty")
    if len(entries) > limits.max_entries:
        raise error(f"the zip archive has {len(entries)} entries, more than the limit of {limits.max_entries}")

    seen_names: set[str] = set()
    total_bytes = 0
    for entry in entries:
        name = entry.filename
        _check_entry_name(name, error)
        if name in seen_names:
            raise error(f"the zip archive has two entries named {name!r}")
        seen_names.add(name)

        if entry.flag_bits & 0x1:
            raise error(f"zip entry {name!r} is encrypted")
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise error(f"zip entry {name!r} uses compression method {entry.compress_type}; only stored or deflated entries are accepted")
        if entry.file_size < 0 or entry.compress_size < 0:
            raise error(f"zip entry {name!r} declares a negative size")
        if entry.compress_type == zipfile.ZIP_STORED and entry.compress_size != entry.file_size:
            raise error(f"zip entry {name!r} is stored uncompressed but declares two different sizes")
        if entry.file_size >= limits.ratio_check_min_bytes:
            ratio = entry.file_size / max(entry.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise error(
                    f"zip entry {name!r} expands {ratio:.0f}:1, above the limit of {limits.max_compression_ratio:.0f}:1 (a compression bomb?)"
                )
        total_bytes += entry.file_size
        if total_bytes > limits.max_total_uncompressed_bytes:
            raise error(f"the zip archive declares more than {limits.max_total_uncompressed_bytes} uncompressed bytes, above the limit")

    _check_entries_do_not_overlap(entries, getattr(archive, "start_dir", file_size), error)
    return single_top_level_prefix(archive.namelist(), error) if single_prefix else None


def single_top_level_prefix(names: list[str], error: type[CompactorError] = InvalidModel) -> str:
    """The one folder every entry of a torch archive lies under; torch reads records relative to it."""
    prefixes: set[str] = set()
    for name in names:
        parts = name.split("/")
        if len(parts) < 2 or parts[0] == "" or parts[1] == "":
            raise error(f"zip entry {name!r} is not inside a top-level folder, as torch.save writes it")
        prefixes.add(parts[0])
    if len(prefixes) != 1:
        shown = ", ".join(sorted(prefixes)[:5])
        raise error(f"zip entries lie under {len(prefixes)} top-level folders ({shown}); torch archives use exactly one")
    return prefixes.pop()


_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def _check_entry_name(name: str, error: type[CompactorError]) -> None:
    if not name or "\x00" in name:
        raise error("a zip entry has an empty name or a NUL byte in its name")
    if "\\" in name:
        raise error(f"zip entry {name!r} contains a backslash")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise error(f"zip entry {name!r} is an absolute path")
    if ".." in PurePosixPath(name).parts:
        raise error(f"zip entry {name!r} contains '..'")


_LOCAL_HEADER_FIXED_BYTES = 30


def _check_entries_do_not_overlap(entries: list[zipfile.ZipInfo], data_end: int, error: type[CompactorError]) -> None:
    """Overlapping entries let a small file declare many large ones (Fifield's non-recursive zip bomb)."""
    ordered = sorted(entries, key=lambda entry: entry.header_offset)
    for index, entry in enumerate(ordered):
        # A lower bound on where the entry's data ends: the local header's
        # extra field can only add bytes, so this never flags a valid archive.
        end = entry.header_offset + _LOCAL_HEADER_FIXED_BYTES + len(entry.orig_filename.encode("utf-8")) + entry.compress_size
        limit = ordered[index + 1].header_offset if index + 1 < len(ordered) else data_end
        if entry.header_offset < 0 or end > limit:
            raise error(f"zip entry {entry.filename!r} overlaps the next entry or runs into the zip's central directory")


def _check_central_directory(path: Path, limits: ArchiveLimits, error: type[CompactorError]) -> None:
    """Refuse a central directory too large to parse, from its end record alone.

    zipfile parses the whole directory into memory when it opens an archive, so the
    entry count cannot wait for ``check_zip_archive``. The end record is located with
    zipfile's own ``_EndRecData`` (private, stable since Python 2; Python is pinned to
    3.11): the directory whose size is checked is exactly the one ZipFile then reads."""
    try:
        with path.open("rb") as handle:
            end_record = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    except OSError as exc:
        raise error(f"the zip archive cannot be read: {exc}") from exc
    if end_record is None:
        return  # no end record: ZipFile raises BadZipFile, reported by _open_zip
    declared_entries = end_record[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    directory_bytes = end_record[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if declared_entries > limits.max_entries:
        raise error(f"the zip archive has {declared_entries} entries, more than the limit of {limits.max_entries}")
    if directory_bytes > limits.max_central_directory_bytes:
        raise error(
            f"the zip archive's central directory is {directory_bytes} bytes, above the limit of "
            f"{limits.max_central_directory_bytes} (too many entries, or entries with very long names)"
        )


def open_zip(path: Path, error: type[CompactorError], limits: ArchiveLimits) -> zipfile.ZipFile:
    _check_central_directory(path, limits, error)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"the file starts like a zip archive but is truncated or corrupt: {exc}") from exc


def read_entry(archive: zipfile.ZipFile, name: str, max_bytes: int, error: type[CompactorError]) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > max_bytes:
        raise error(f"zip entry {name!r} is {info.file_size} bytes, above the limit of {max_bytes}")
    try:
        with archive.open(info) as handle:
            return handle.read(max_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"zip entry {name!r} cannot be read (truncated or corrupt archive): {exc}") from exc
