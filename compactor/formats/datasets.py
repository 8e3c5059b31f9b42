"""Shapes and sample counts of an uploaded dataset, without torch and without loading its data.

* ``.npz``: read only the ``.npy`` headers of ``inputs`` (and ``targets``) inside the
  zip (``numpy.lib.format``; nothing is unpickled, no array data is read).
* ``.pt`` written by ``torch.save``: read the archive's ``data.pkl`` with a restricted
  unpickler whose ``find_class`` resolves only an allowlist of torch rebuild functions
  and storage type names, each mapped to a harmless local stand-in that records a
  shape. Nothing else can ever be resolved; anything else is ``InvalidDataset``.

Both check that ``targets`` (when present) has as many rows as ``inputs``.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactor.errors import InvalidDataset
from compactor.formats.detection import DatasetFileFormat, dataset_format_in, open_dataset_archive
from compactor.formats.limits import ArchiveLimits
from compactor.formats.npy import parse_npy_header, read_entry_head


@dataclass(frozen=True)
class DatasetInfo:
    num_samples: int
    has_targets: bool
    input_shape: tuple[int, ...]


def inspect_dataset(path: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> tuple[DatasetFileFormat, DatasetInfo]:
    """Format and shapes of an uploaded dataset in one pass: the archive is opened and checked
    once, and a .pt's data.pkl read once (the detection's bytes are the ones unpickled here)."""
    with open_dataset_archive(Path(path), limits) as archive:
        detected = dataset_format_in(archive, limits)
        if detected.format == "npz":
            return "npz", _npz_info(archive, limits)
        assert detected.pickle_bytes is not None and detected.prefix is not None
        return "pt", _pt_info(archive, detected.pickle_bytes, detected.prefix)


def dataset_info(path: str | Path, format: str, limits: ArchiveLimits = ArchiveLimits()) -> DatasetInfo:
    """Shapes of a dataset whose format is known (a stored upload's record says it)."""
    detected, info = inspect_dataset(path, limits)
    if detected != format:
        raise InvalidDataset(f"the dataset is a {detected!r} file, not {format!r}: upload a .pt (torch.save) or .npz file")
    return info


def dataset_num_samples(path: str | Path, format: str) -> int:
    """Number of samples (rows of ``inputs``) of a ``pt`` or ``npz`` dataset file."""
    return dataset_info(path, format).num_samples


def _check_rows(inputs: tuple[int, ...], targets: tuple[int, ...] | None) -> DatasetInfo:
    if len(inputs) < 1:
        raise InvalidDataset("'inputs' must have a leading sample dimension (shape [N, ...])")
    if inputs[0] < 1:
        raise InvalidDataset("'inputs' holds no samples")
    if targets is not None:
        if len(targets) != 1:
            raise InvalidDataset(f"'targets' must be one-dimensional (shape [N]), got shape {list(targets)}")
        if targets[0] != inputs[0]:
            raise InvalidDataset(f"'targets' has {targets[0]} rows but 'inputs' has {inputs[0]}: they must match")
    return DatasetInfo(num_samples=inputs[0], has_targets=targets is not None, input_shape=inputs)


# -- .npz --------------------------------------------------------------------------------------


def _npy_shape(archive: zipfile.ZipFile, member: str, limits: ArchiveLimits) -> tuple[int, ...]:
    info = archive.getinfo(member)
    return parse_npy_header(read_entry_head(archive, member, limits.max_npy_header_bytes), info.file_size, member).shape


def _npz_info(archive: zipfile.ZipFile, limits: ArchiveLimits) -> DatasetInfo:
    names = set(archive.namelist())
    if "inputs.npy" not in names:
        raise InvalidDataset("the .npz has no 'inputs' array: save it with np.savez(f, inputs=..., targets=...)")
    inputs = _npy_shape(archive, "inputs.npy", limits)
    targets = _npy_shape(archive, "targets.npy", limits) if "targets.npy" in names else None
    return _check_rows(inputs, targets)


# -- .pt (torch.save zip) ----------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRecord:
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    shape: tuple[int, ...]


_STORAGE_TYPES = frozenset(
    f"{kind}Storage"
    for kind in (
        "Float",
        "Double",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexFloat",
        "ComplexDouble",
    )
)


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise InvalidDataset(f"the .pt dataset has a malformed tensor {what}")
    return value


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRecord:
    if not isinstance(storage, _StorageRecord) or not isinstance(storage_offset, int):
        raise InvalidDataset("the .pt dataset has a malformed tensor record")
    shape = _as_int_tuple(size, "size")
    strides = _as_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise InvalidDataset("the .pt dataset has a tensor whose size and stride disagree")
    if math.prod(shape) > 0:
        extent = storage_offset + sum((dim - 1) * step for dim, step in zip(shape, strides, strict=True)) + 1
        if extent > storage.numel:
            raise InvalidDataset("the .pt dataset has a tensor larger than its storage")
    return _TensorRecord(shape)


def _rebuild_parameter(data: Any, *_rest: Any) -> _TensorRecord:
    if not isinstance(data, _TensorRecord):
        raise InvalidDataset("the .pt dataset has a malformed parameter record")
    return data


def _empty_hooks(*args: Any) -> dict[Any, Any]:
    # ``collections.OrderedDict()`` of backward hooks; torch.save always writes it empty.
    if args:
        raise InvalidDataset("the .pt dataset carries tensor hooks; save plain tensors")
    return {}


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _empty_hooks,
}


class _ShapeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage_keys: set[str]) -> None:
        super().__init__(io.BytesIO(data))
        self._storage_keys = storage_keys

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _ALLOWED_GLOBALS.get((module, name))
        if stand_in is not None:
            return stand_in
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(name)
        raise InvalidDataset(
            f"the .pt dataset refers to {module}.{name}, which a dataset never needs: "
            "save a dict of tensors, torch.save({'inputs': x, 'targets': y}, f)"
        )

    def persistent_load(self, pid: Any) -> _StorageRecord:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
        ):
            raise InvalidDataset("the .pt dataset has a malformed storage reference")
        if pid[2] not in self._storage_keys:
            raise InvalidDataset(f"the .pt dataset refers to storage {pid[2]!r} that the archive does not hold")
        return _StorageRecord(key=pid[2], numel=pid[4])


def _pt_info(archive: zipfile.ZipFile, raw: bytes, prefix: str) -> DatasetInfo:
    # The archive's structure (one top-level folder, data.pkl within the size limit, its globals
    # all tensor rebuilds) was checked by dataset_format_in, which read ``raw``.
    storage_root = f"{prefix}/data/"
    storage_keys = {name[len(storage_root) :] for name in archive.namelist() if name.startswith(storage_root)}
    try:
        obj = _ShapeUnpickler(raw, storage_keys).load()
    except InvalidDataset:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the client's bad file
        raise InvalidDataset(f"the .pt dataset cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or "inputs" not in obj:
        raise InvalidDataset("the .pt dataset must be a dict with 'inputs' (and optional 'targets') tensors")
    extra = set(obj) - {"inputs", "targets"}
    if extra:
        raise InvalidDataset(f"the .pt dataset has unexpected keys {sorted(map(str, extra))}; only 'inputs' and 'targets'")
    inputs, targets = obj["inputs"], obj.get("targets")
    if not isinstance(inputs, _TensorRecord) or (targets is not None and not isinstance(targets, _TensorRecord)):
        raise InvalidDataset("'inputs' and 'targets' in the .pt dataset must be tensors")
    return _check_rows(inputs.shape, None if targets is None else targets.shape)
