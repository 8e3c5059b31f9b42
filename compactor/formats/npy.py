"""``.npy`` headers inside an ``.npz``: plain numeric dtypes whose shape fills the entry."""

from __future__ import annotations

import ast
import re
import struct
import zipfile
from dataclasses import dataclass

from compactor.errors import InvalidDataset

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


def read_entry_head(archive: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    try:
        with archive.open(name) as handle:
            return handle.read(max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InvalidDataset(f"npz entry {name!r} cannot be read (truncated or corrupt archive): {exc}") from exc
