"""The safetensors header (8-byte length + JSON), read and checked without the safetensors package."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from compactor.errors import InvalidModel
from compactor.formats.limits import ArchiveLimits

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


def looks_like_safetensors(head: bytes, limits: ArchiveLimits) -> bool:
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
            raise InvalidModel(f"the safetensors header declares {header_size} bytes, above the limit of {limits.max_safetensors_header_bytes}")
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
