"""Format detection and structural validation of uploaded model and dataset files.

Imports no torch: the gateway calls this at submission to refuse bad uploads
before anything is queued, and the worker calls it again before torch sees a
file. Formats are detected from the bytes, never from file names.

What is recognised:

* a ``torch.jit.save`` archive (zip with ``<prefix>/code/`` and
  ``<prefix>/constants.pkl``): ``"torchscript"``;
* a ``torch.save`` zip whose ``<prefix>/data.pkl`` only references the globals
  a plain state_dict (or a dict of tensors) needs: ``"state_dict"`` for
  models, ``"pt"`` for datasets;
* a safetensors file (8-byte little-endian header length + JSON header):
  ``"safetensors"``;
* a numpy ``.npz`` (zip of ``.npy`` entries with plain numeric dtypes):
  ``"npz"`` for datasets.

The pickle is inspected with :func:`pickletools.genops`, which parses opcodes
and never executes them. Every global the pickle would import (``GLOBAL``,
``INST``, ``STACK_GLOBAL``; the operands of ``STACK_GLOBAL`` are tracked
through a small abstract stack and the memo) must be in
:data:`STATE_DICT_GLOBALS`. This is a gate in front of
``torch.load(weights_only=True)``, not a replacement for it: the loader still
uses weights-only loading, and never falls back to anything else.
"""

from __future__ import annotations

import ast
import json
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from compactor.errors import (
    SAFE_MODEL_FORMATS_HINT,
    CompactorError,
    InvalidDataset,
    InvalidModel,
    InvalidSpec,
    UnsafeModel,
    UnsupportedModelFormat,
)

ModelFileFormat = Literal["torchscript", "state_dict", "safetensors"]
DatasetFileFormat = Literal["pt", "npz"]

_GIB = 1024**3
_MIB = 1024**2


@dataclass(frozen=True)
class ArchiveLimits:
    """Budgets a zip archive (or safetensors header) must fit before anything reads it.

    Sizes are the *declared* (uncompressed) sizes from the zip's central
    directory; readers downstream (zipfile, torch's miniz reader, numpy) never
    produce more than the declared size, so the budget bounds what is read.
    """

    max_entries: int = 10_000
    # zipfile parses the whole central directory into ZipInfo objects (~600 bytes each, from
    # records as small as 47 bytes) before any entry can be counted: its declared size is
    # checked first. torch writes ~75 bytes per entry; this allows 10,000 entries of 200.
    max_central_directory_bytes: int = 2 * _MIB
    max_total_uncompressed_bytes: int = 8 * _GIB
    # Deflate tops out near 1032:1; real weights and images compress far less
    # than 200:1, so anything above is a bomb (or an all-zero array, which is
    # useless as data anyway).
    max_compression_ratio: float = 200.0
    # Entries smaller than this are exempt from the ratio check: a tiny entry
    # cannot be a bomb, and small constant files compress well.
    ratio_check_min_bytes: int = 64 * 1024
    max_pickle_bytes: int = 64 * _MIB
    # {'inputs': x, 'targets': y} pickles to well under 1 KiB. Whatever else a dataset's
    # pickle holds, the loaders still build as plain containers at ~15x its size (a 12 MiB
    # dict of ints cost 195 MiB to count samples in the gateway, as much in torch.load).
    max_dataset_pickle_bytes: int = 1 * _MIB
    max_safetensors_header_bytes: int = 64 * _MIB
    max_npy_header_bytes: int = 64 * 1024


# (module, name) pairs a plain state_dict or dict of tensors pickles, as
# torch 2.14.1 writes them (checked against its real output for every dtype).
# Protocol-2 pickles spell builtins as ``__builtin__``; both spellings listed.
_STORAGE_NAMES = (
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
)
_DTYPE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
)
STATE_DICT_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        # Used for dtypes without a legacy typed storage (uint16, float8, ...).
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "device"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("__builtin__", "set"),
    }
    | {("torch", name) for name in _STORAGE_NAMES}
    | {("torch", name) for name in _DTYPE_NAMES}
)

# Opcodes whose argument is a string that STACK_GLOBAL may consume.
_STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})

_MARK = object()  # a MARK on the abstract stack
_UNKNOWN = object()  # any value whose content the scan does not track


class MalformedPickle(ValueError):
    """The bytes are not a well-formed pickle (truncated, bad opcode, stack underflow)."""


def pickle_globals(pickle_bytes: bytes) -> list[str]:
    """Every global a pickle would import, as ``"module.name"``, without unpickling it.

    Globals whose name cannot be determined statically (a ``STACK_GLOBAL`` fed
    by computed values) or that go through the copyreg extension registry are
    returned as ``"<...>"`` descriptions, which no allowlist contains.
    Raises :class:`MalformedPickle` on bytes that are not a complete pickle.
    """
    found: list[str] = []
    for module, name in _pickle_global_pairs(pickle_bytes):
        found.append(name if module == "" else f"{module}.{name}")
    return found


def _pickle_global_pairs(pickle_bytes: bytes) -> list[tuple[str, str]]:
    stack: list[object] = []
    memo: list[object] = []
    found: list[tuple[str, str]] = []
    stopped = False
    try:
        # genops stops at STOP; like the unpickler, it ignores any bytes after it.
        for opcode, arg, _position in pickletools.genops(pickle_bytes):
            name = opcode.name
            if name == "STOP":
                stopped = True
            if name in ("GLOBAL", "INST"):
                parts = str(arg).split(" ")
                # A module or name with a space would be ambiguous; no real global has one.
                found.append((parts[0], parts[1]) if len(parts) == 2 else ("", f"<global {arg!r}>"))
            elif name == "STACK_GLOBAL":
                if len(stack) < 2:
                    raise MalformedPickle("STACK_GLOBAL with fewer than two stack items")
                module, attribute = stack[-2], stack[-1]
                if isinstance(module, str) and isinstance(attribute, str):
                    found.append((module, attribute))
                else:
                    found.append(("", "<STACK_GLOBAL with computed operands>"))
            elif name in _EXTENSION_OPCODES:
                found.append(("", f"<copyreg extension code {arg}>"))

            _apply_stack_effect(opcode, arg, stack, memo)
    except MalformedPickle:
        raise
    except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as error:
        raise MalformedPickle(f"not a well-formed pickle: {error}") from error
    if not stopped:
        raise MalformedPickle("pickle ends without a STOP opcode (truncated)")
    return found


# Bounds on the scan's own memory (a 64 MiB pickle of one-byte pushes would otherwise hold
# 64 M stack items). Python's pickler batches containers 1,000 items at a time, so a real
# state_dict's stack stays a few thousand deep; it memoizes ~9 objects per tensor.
MAX_PICKLE_STACK_ITEMS = 100_000
MAX_PICKLE_MEMO_ITEMS = 4_000_000


def _apply_stack_effect(opcode: pickletools.OpcodeInfo, arg: object, stack: list[object], memo: list[object]) -> None:
    """Track the stack just closely enough to know which strings STACK_GLOBAL consumes."""
    name = opcode.name
    if name in _MEMO_PUT_OPCODES or name in ("MEMOIZE", "DUP"):
        # The real unpickler cannot see past a MARK either: it fails where this does.
        if not stack or stack[-1] is _MARK:
            raise MalformedPickle(f"{name} on an empty stack")
    if name in _MEMO_PUT_OPCODES or name == "MEMOIZE":
        key = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[call-overload]
        if key < len(memo):
            memo[key] = stack[-1]
            return
        # Picklers number memo entries 0, 1, 2, ...; a key far ahead makes C's unpickler
        # size its memo table to the key (PUT 2**28 costs the loader 4 GiB of memory).
        if key > len(memo):
            raise MalformedPickle(f"{name} of memo key {key} out of sequence (next key is {len(memo)})")
        if len(memo) >= MAX_PICKLE_MEMO_ITEMS:
            raise MalformedPickle(f"the pickle memoizes more than {MAX_PICKLE_MEMO_ITEMS} objects")
        memo.append(stack[-1])
        return
    if name in _MEMO_GET_OPCODES:
        key = int(arg)  # type: ignore[call-overload]
        if not 0 <= key < len(memo):
            raise MalformedPickle(f"{name} of memo key {key} that was never stored")
        stack.append(memo[key])
        return
    if name == "MARK":
        stack.append(_MARK)
        return
    if name == "DUP":
        stack.append(stack[-1])
        return

    before = opcode.stack_before
    if pickletools.markobject in before:
        # Pops everything down to and including the topmost MARK.
        while True:
            if not stack:
                raise MalformedPickle(f"{name} without a matching MARK")
            if stack.pop() is _MARK:
                break
        # Items below the mark that the opcode also consumes (the list of APPENDS, the dict of SETITEMS, ...).
        fixed_pops = before.index(pickletools.markobject)
        for _ in range(fixed_pops):
            if not stack or stack.pop() is _MARK:
                raise MalformedPickle(f"stack underflow at {name}")
    else:
        for _ in range(len(before)):
            if not stack:
                raise MalformedPickle(f"stack underflow at {name}")
            if stack.pop() is _MARK:
                raise MalformedPickle(f"{name} consumed a MARK")

    if len(stack) + len(opcode.stack_after) > MAX_PICKLE_STACK_ITEMS:
        raise MalformedPickle(f"the pickle's stack grows past {MAX_PICKLE_STACK_ITEMS} items")
    if name in _STRING_OPCODES:
        stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        return
    for _ in opcode.stack_after:
        stack.append(_UNKNOWN)


# --------------------------------------------------------------------------- zip


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
                    f"zip entry {name!r} expands {ratio:.0f}:1, above the limit of {limits.max_compression_ratio:.0f}:1 "
                    "(a compression bomb?)"
                )
        total_bytes += entry.file_size
        if total_bytes > limits.max_total_uncompressed_bytes:
            raise error(
                f"the zip archive declares more than {limits.max_total_uncompressed_bytes} uncompressed bytes, above the limit"
            )

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


def _open_zip(path: Path, error: type[CompactorError], limits: ArchiveLimits) -> zipfile.ZipFile:
    _check_central_directory(path, limits, error)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"the file starts like a zip archive but is truncated or corrupt: {exc}") from exc


def _read_entry(archive: zipfile.ZipFile, name: str, max_bytes: int, error: type[CompactorError]) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > max_bytes:
        raise error(f"zip entry {name!r} is {info.file_size} bytes, above the limit of {max_bytes}")
    try:
        with archive.open(info) as handle:
            return handle.read(max_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"zip entry {name!r} cannot be read (truncated or corrupt archive): {exc}") from exc


# ----------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def _looks_like_safetensors(head: bytes, limits: ArchiveLimits) -> bool:
    # Plausible header length plus a JSON object: a truncated file still
    # counts, so that read_safetensors_header can say it is truncated.
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    return 2 <= header_size <= limits.max_safetensors_header_bytes and head[8:9] == b"{"


def read_safetensors_header(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> dict[str, SafetensorsEntry]:
    """Parse and validate a safetensors header: sizes, dtypes, shapes and that offsets tile the data exactly.

    Lets the loader count parameters from shapes before anything is allocated.
    Raises InvalidModel with what is wrong.
    """
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidModel("the safetensors file is shorter than its 8-byte header length")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > limits.max_safetensors_header_bytes:
            raise InvalidModel(
                f"the safetensors header declares {header_size} bytes, above the limit of {limits.max_safetensors_header_bytes}"
            )
        if 8 + header_size > file_size:
            raise InvalidModel("the safetensors header runs past the end of the file (truncated upload?)")
        raw_header = handle.read(header_size)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModel(f"the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidModel("the safetensors header is not a JSON object")

    data_size = file_size - 8 - header_size
    entries: dict[str, SafetensorsEntry] = {}
    for name, value in header.items():
        if name == "__metadata__":
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise InvalidModel("safetensors __metadata__ must map strings to strings")
            continue
        entries[name] = _safetensors_entry(name, value, data_size)

    cursor = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].data_offsets):
        begin, end = entry.data_offsets
        if begin != cursor:
            raise InvalidModel(f"safetensors tensor {name!r} starts at byte {begin}, expected {cursor} (overlap or gap)")
        cursor = end
    if cursor != data_size:
        raise InvalidModel(f"safetensors tensors cover {cursor} bytes but the file holds {data_size} bytes of data")
    return entries


def _safetensors_entry(name: str, value: object, data_size: int) -> SafetensorsEntry:
    if not isinstance(value, dict):
        raise InvalidModel(f"safetensors entry {name!r} is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPE_BYTES:
        raise InvalidModel(f"safetensors tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise InvalidModel(f"safetensors tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) and not isinstance(offset, bool) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise InvalidModel(f"safetensors tensor {name!r} has data offsets {offsets!r} outside the file's {data_size} data bytes")
    entry = SafetensorsEntry(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))
    expected = entry.numel * _SAFETENSORS_DTYPE_BYTES[dtype]
    if expected != offsets[1] - offsets[0]:
        raise InvalidModel(f"safetensors tensor {name!r} of shape {shape} and dtype {dtype} needs {expected:g} bytes, not {offsets[1] - offsets[0]}")
    return entry


# ------------------------------------------------------------------ detection

_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_PROTOCOL0_GLOBAL = re.compile(rb"^c[\w.]+\n\w+\n")


def _looks_like_pickle(head: bytes) -> bool:
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return True
    return bool(_PROTOCOL0_GLOBAL.match(head))


def _read_head(path: Path, size: int = 4096) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def detect_model_format(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> ModelFileFormat:
    """Which model format the file holds, after validating its structure.

    Raises UnsafeModel for anything that would need arbitrary unpickling,
    InvalidModel for damaged files and UnsupportedModelFormat for the rest.
    """
    file_size = path.stat().st_size
    head = _read_head(path)
    if not head:
        raise UnsupportedModelFormat(f"the model file is empty; {SAFE_MODEL_FORMATS_HINT}")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        return _detect_zip_model(path, file_size, limits)
    if _looks_like_safetensors(head, limits):
        read_safetensors_header(path, limits)
        return "safetensors"
    if _looks_like_pickle(head):
        raise UnsafeModel(
            "the model file is a raw pickle (legacy torch.save format or plain pickle), which cannot be loaded "
            f"without arbitrary unpickling; {SAFE_MODEL_FORMATS_HINT} (torch.save has written the safe zip format since torch 1.6)"
        )
    raise UnsupportedModelFormat(f"the model file is not a format Compactor recognises; {SAFE_MODEL_FORMATS_HINT}")


def _detect_zip_model(path: Path, file_size: int, limits: ArchiveLimits) -> ModelFileFormat:
    with _open_zip(path, InvalidModel, limits) as archive:
        check_zip_archive(archive, limits, file_size=file_size, single_prefix=False, error=InvalidModel)
        names = archive.namelist()
        if all(name.endswith(".npy") for name in names):
            raise UnsupportedModelFormat(f"this is a numpy .npz archive, which is a dataset format, not a model; {SAFE_MODEL_FORMATS_HINT}")
        prefix = single_top_level_prefix(names, InvalidModel)
        name_set = set(names)
        has_code = any(name.startswith(f"{prefix}/code/") for name in names)
        if has_code:
            if f"{prefix}/constants.pkl" not in name_set or f"{prefix}/data.pkl" not in name_set:
                raise InvalidModel("the TorchScript archive lacks constants.pkl or data.pkl (truncated or hand-made?)")
            return "torchscript"
        if f"{prefix}/data.pkl" not in name_set:
            raise UnsupportedModelFormat(
                f"the zip archive is neither a torch.save nor a TorchScript archive (no data.pkl); {SAFE_MODEL_FORMATS_HINT}"
            )
        pickle_bytes = _read_entry(archive, f"{prefix}/data.pkl", limits.max_pickle_bytes, InvalidModel)
    try:
        disallowed = disallowed_globals(pickle_bytes)
    except MalformedPickle as exc:
        raise InvalidModel(f"the archive's data.pkl is damaged: {exc}") from exc
    if disallowed:
        raise UnsafeModel(
            f"the file pickles {_describe_globals(disallowed)}, which only arbitrary unpickling could load "
            f"(a whole pickled nn.Module, or custom objects); {SAFE_MODEL_FORMATS_HINT}"
        )
    return "state_dict"


def disallowed_globals(pickle_bytes: bytes, allowed: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS) -> list[str]:
    """The globals of a pickle that are not in ``allowed``, in first-seen order, without duplicates."""
    out: list[str] = []
    for module, name in _pickle_global_pairs(pickle_bytes):
        if (module, name) in allowed:
            continue
        described = name if module == "" else f"{module}.{name}"
        if described not in out:
            out.append(described)
    return out


def _describe_globals(names: Iterable[str], shown: int = 5) -> str:
    names = list(names)
    listed = ", ".join(f"'{name}'" for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{listed}{more}"


def check_declared_format(declared: str, detected: str) -> None:
    """A declared ``spec.model.format`` (other than "auto") must match what the bytes are."""
    if declared != "auto" and declared != detected:
        raise InvalidSpec(
            f"spec.model.format says {declared!r} but the uploaded file is {detected!r}; "
            "set model.format to 'auto' or to the file's real format",
            field="model.format",
        )


# -------------------------------------------------------------------- datasets

_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"^[<>|=]?([biuf])(\d+)$")


@dataclass(frozen=True)
class NpyHeader:
    kind: str  # numpy dtype kind: b (bool), i, u, f
    itemsize: int
    shape: tuple[int, ...]
    fortran_order: bool


def parse_npy_header(data: bytes, entry_size: int, name: str) -> NpyHeader:
    """Parse a .npy header (the first bytes of the entry) and check it describes plain numbers filling the entry."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise InvalidDataset(f"npz entry {name!r} is not a .npy array")
    major = data[6]
    if major == 1:
        (header_length,) = struct.unpack("<H", data[8:10])
        start = 10
    elif major in (2, 3):
        if len(data) < 12:
            raise InvalidDataset(f"npz entry {name!r} has a truncated .npy header")
        (header_length,) = struct.unpack("<I", data[8:12])
        start = 12
    else:
        raise InvalidDataset(f"npz entry {name!r} has unknown .npy format version {major}")
    if start + header_length > len(data):
        raise InvalidDataset(f"npz entry {name!r} has a .npy header longer than allowed")
    encoding = "utf-8" if major == 3 else "latin-1"
    try:
        # literal_eval evaluates literals only (numpy itself reads headers this way).
        header = ast.literal_eval(data[start : start + header_length].decode(encoding))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as exc:
        raise InvalidDataset(f"npz entry {name!r} has an unreadable .npy header") from exc
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise InvalidDataset(f"npz entry {name!r} has a malformed .npy header")
    descr, shape, fortran_order = header["descr"], header["shape"], header["fortran_order"]
    if not isinstance(descr, str):
        raise InvalidDataset(f"npz entry {name!r} holds a structured array; only plain numeric arrays are accepted")
    match = _NPY_DESCR.match(descr)
    if match is None:
        what = "Python objects (object dtype, which needs unpickling)" if "O" in descr else f"dtype {descr!r}"
        raise InvalidDataset(f"npz entry {name!r} holds {what}; only bool, integer and float arrays are accepted")
    if not isinstance(shape, tuple) or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise InvalidDataset(f"npz entry {name!r} has an invalid shape {shape!r}")
    if not isinstance(fortran_order, bool):
        raise InvalidDataset(f"npz entry {name!r} has an invalid fortran_order")
    kind, itemsize = match.group(1), int(match.group(2))
    count = 1
    for dim in shape:
        count *= dim
    if start + header_length + count * itemsize != entry_size:
        raise InvalidDataset(f"npz entry {name!r} declares shape {shape} of {descr} but its size does not match (truncated?)")
    return NpyHeader(kind=kind, itemsize=itemsize, shape=tuple(shape), fortran_order=fortran_order)


def detect_dataset_format(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> DatasetFileFormat:
    """``"pt"`` for a torch.save zip of tensors, ``"npz"`` for a numpy archive of numeric arrays; else InvalidDataset."""
    file_size = path.stat().st_size
    head = _read_head(path, 8)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC)):
        hint = " (a raw or legacy pickle, which cannot be loaded safely)" if _looks_like_pickle(_read_head(path)) else ""
        raise InvalidDataset(
            f"the dataset is not a torch.save .pt archive or a numpy .npz{hint}; "
            "save it with torch.save({'inputs': x, 'targets': y}, f) or numpy.savez(f, inputs=x, targets=y)"
        )
    with _open_zip(path, InvalidDataset, limits) as archive:
        check_zip_archive(archive, limits, file_size=file_size, single_prefix=False, error=InvalidDataset)
        names = archive.namelist()
        if all(name.endswith(".npy") for name in names):
            for name in names:
                info = archive.getinfo(name)
                head_bytes = _read_entry_head(archive, name, limits.max_npy_header_bytes)
                parse_npy_header(head_bytes, info.file_size, name)
            if "inputs.npy" not in names:
                shown = ", ".join(sorted(name[: -len(".npy")] for name in names)[:5])
                raise InvalidDataset(f"the .npz has no 'inputs' array (it has: {shown})")
            return "npz"
        prefix = single_top_level_prefix(names, InvalidDataset)
        if any(name.startswith(f"{prefix}/code/") for name in names):
            raise InvalidDataset("this is a TorchScript model archive, not a dataset")
        if f"{prefix}/data.pkl" not in names:
            raise InvalidDataset("the zip archive is neither a torch.save .pt nor a numpy .npz")
        pickle_bytes = _read_entry(
            archive, f"{prefix}/data.pkl", min(limits.max_pickle_bytes, limits.max_dataset_pickle_bytes), InvalidDataset
        )
    try:
        disallowed = disallowed_globals(pickle_bytes)
    except MalformedPickle as exc:
        raise InvalidDataset(f"the dataset's data.pkl is damaged: {exc}") from exc
    if disallowed:
        raise InvalidDataset(
            f"the dataset pickles {_describe_globals(disallowed)}, which cannot be loaded without arbitrary unpickling; "
            "save a plain dict of tensors: torch.save({'inputs': x, 'targets': y}, f)"
        )
    return "pt"


def _read_entry_head(archive: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    try:
        with archive.open(name) as handle:
            return handle.read(max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InvalidDataset(f"npz entry {name!r} cannot be read (truncated or corrupt archive): {exc}") from exc
