"""Which format an upload is, from its bytes (never its name), after its structure is checked."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from compactor.formats.limits import ArchiveLimits
from compactor.formats.npy import parse_npy_header, read_entry_head
from compactor.formats.pickle_scan import MalformedPickle, describe_globals, disallowed_globals
from compactor.formats.safetensors import looks_like_safetensors, read_safetensors_header
from compactor.formats.zip_guard import check_zip_archive, open_zip, read_entry, single_top_level_prefix
from compactor.graph_ops import check_ops, serialized_target_op

ModelFileFormat = Literal["torchscript", "state_dict", "safetensors", "pt2"]
DatasetFileFormat = Literal["pt", "npz"]

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
    if head.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
        return _detect_zip_model(path, file_size, limits)
    if looks_like_safetensors(head, limits):
        read_safetensors_header(path, limits)
        return "safetensors"
    if _looks_like_pickle(head):
        raise UnsafeModel(
            "the model file is a raw pickle (legacy torch.save format or plain pickle), which cannot be loaded "
            f"without arbitrary unpickling; {SAFE_MODEL_FORMATS_HINT} (torch.save has written the safe zip format since torch 1.6)"
        )
    raise UnsupportedModelFormat(f"the model file is not a format Compactor recognises; {SAFE_MODEL_FORMATS_HINT}")


def _detect_zip_model(path: Path, file_size: int, limits: ArchiveLimits) -> ModelFileFormat:
    with open_zip(path, InvalidModel, limits) as archive:
        check_zip_archive(archive, limits, file_size=file_size, single_prefix=False, error=InvalidModel)
        names = archive.namelist()
        if all(name.endswith(".npy") for name in names):
            raise UnsupportedModelFormat(f"this is a numpy .npz archive, which is a dataset format, not a model; {SAFE_MODEL_FORMATS_HINT}")
        prefix = single_top_level_prefix(names, InvalidModel)
        name_set = set(names)
        if f"{prefix}/{PT2_PROGRAM}" in name_set and f"{prefix}/archive_format" in name_set:
            _check_pt2(archive, prefix, name_set, limits)
            return "pt2"
        has_code = any(name.startswith(f"{prefix}/code/") for name in names)
        if has_code:
            if f"{prefix}/constants.pkl" not in name_set or f"{prefix}/data.pkl" not in name_set:
                raise InvalidModel("the TorchScript archive lacks constants.pkl or data.pkl (truncated or hand-made?)")
            return "torchscript"
        if f"{prefix}/data.pkl" not in name_set:
            raise UnsupportedModelFormat(
                f"the zip archive is neither a torch.save nor a TorchScript archive (no data.pkl); {SAFE_MODEL_FORMATS_HINT}"
            )
        pickle_bytes = read_entry(archive, f"{prefix}/data.pkl", limits.max_pickle_bytes, InvalidModel)
    _refuse_unsafe_pickle(
        pickle_bytes,
        damaged=lambda why: InvalidModel(f"the archive's data.pkl is damaged: {why}"),
        unsafe=lambda globals_: UnsafeModel(
            f"the file pickles {globals_}, which only arbitrary unpickling could load "
            f"(a whole pickled nn.Module, or custom objects); {SAFE_MODEL_FORMATS_HINT}"
        ),
    )
    return "state_dict"


def _refuse_unsafe_pickle(pickle_bytes: bytes, *, damaged: Callable[[str], CompactorError], unsafe: Callable[[str], CompactorError]) -> None:
    """The opcode scan every pickle of an upload goes through: ``damaged(parse error)`` when it is
    no well-formed pickle, ``unsafe(described globals)`` when it imports anything but the tensor
    rebuilds of a plain state_dict."""
    try:
        disallowed = disallowed_globals(pickle_bytes)
    except MalformedPickle as exc:
        raise damaged(str(exc)) from exc
    if disallowed:
        raise unsafe(describe_globals(disallowed))


# A torch.export.save archive: the program as JSON, weights and constants described by JSON
# configs, and torch.save payloads (sample inputs; tensors flagged use_pickle) inside.
PT2_PROGRAM = "models/model.json"
_PT2_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
_PT2_TENSOR_PREFIXES = ("weight_", "tensor_")


def _check_pt2(archive: zipfile.ZipFile, prefix: str, names: set[str], limits: ArchiveLimits) -> None:
    """What the gateway can refuse in a .pt2 without torch: script and opaque objects (they load
    through arbitrary unpickling), and any torch.save payload that pickles more than tensors. The
    worker reads the archive with torch.load(weights_only=True) only (worker/compression/pt2.py)."""
    for config_name in _PT2_CONFIGS:
        if f"{prefix}/{config_name}" not in names:
            raise InvalidModel(f"the torch.export archive has no {config_name} (a legacy or foreign format; re-save it with torch.export.save)")
        try:
            config = json.loads(read_entry(archive, f"{prefix}/{config_name}", limits.max_pickle_bytes, InvalidModel))
            entries = config["config"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidModel(f"the torch.export archive's {config_name} is malformed: {exc}") from None
        directory = config_name.rsplit("/", 1)[0]
        for fqn, meta in entries:
            path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
            if not path_name.startswith(_PT2_TENSOR_PREFIXES):
                raise UnsafeModel(
                    f"the torch.export archive's {fqn!r} is a script or opaque object ({path_name[:80]}), which loads through "
                    f"arbitrary unpickling; export a model of tensors and ATen ops. {SAFE_MODEL_FORMATS_HINT}"
                )
            if meta.get("use_pickle"):
                _check_torch_save_payload(archive, f"{prefix}/{directory}/{path_name}", limits, f"tensor {fqn!r}")
    for name in sorted(names):
        if name.startswith(f"{prefix}/data/sample_inputs/"):
            _check_torch_save_payload(archive, name, limits, "sample inputs")
    _check_pt2_ops(archive, prefix, names, limits)


def _first_output_name(outputs: object) -> str:
    """The serialized node's first output (``{"as_tensor": {"name": "conv2d"}}``), for messages."""
    first = outputs[0] if isinstance(outputs, list) and outputs else None
    value = next(iter(first.values()), None) if isinstance(first, dict) and first else None
    name = value.get("name") if isinstance(value, dict) else None
    return repr(name) if isinstance(name, str) else "an output"


def _check_pt2_ops(archive: zipfile.ZipFile, prefix: str, names: set[str], limits: ArchiveLimits) -> None:
    """Every op the program's JSON names, against the allowlist, before the upload is stored (the
    worker checks the loaded graph again)."""
    if f"{prefix}/{PT2_PROGRAM}" not in names:
        raise InvalidModel(f"the torch.export archive has no {PT2_PROGRAM} (was it written by torch.export.save?)")
    try:
        program = json.loads(read_entry(archive, f"{prefix}/{PT2_PROGRAM}", limits.max_pickle_bytes, InvalidModel))
    except ValueError as exc:
        raise InvalidModel(f"the torch.export archive's {PT2_PROGRAM} is not JSON: {exc}") from None
    ops: dict[str, str] = {}
    pending: list[object] = [program]
    while pending:  # every graph, nested ones (cond branches) included; iterative, any depth
        item = pending.pop()
        if isinstance(item, dict):
            target = item.get("target")
            if isinstance(target, str) and "inputs" in item and "outputs" in item:
                op = serialized_target_op(target)
                if op is not None:
                    ops.setdefault(op, f"the node computing {_first_output_name(item['outputs'])} in {PT2_PROGRAM}")
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    if not ops:
        raise InvalidModel(f"the torch.export archive's {PT2_PROGRAM} holds no graph nodes (truncated or hand-made?)")
    check_ops(ops)


def _check_torch_save_payload(archive: zipfile.ZipFile, name: str, limits: ArchiveLimits, what: str) -> None:
    payload = read_entry(archive, name, limits.max_pickle_bytes, InvalidModel)
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as inner:
            pickles = [entry for entry in inner.namelist() if entry.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise InvalidModel(f"the torch.export archive's {what} is not a torch.save payload")
            pickle_bytes = read_entry(inner, pickles[0], limits.max_pickle_bytes, InvalidModel)
    except zipfile.BadZipFile:
        raise InvalidModel(f"the torch.export archive's {what} is not a torch.save payload") from None
    _refuse_unsafe_pickle(
        pickle_bytes,
        damaged=lambda why: InvalidModel(f"the torch.export archive's {what} is damaged: {why}"),
        unsafe=lambda globals_: UnsafeModel(f"the torch.export archive's {what} pickles {globals_}, which only arbitrary unpickling could load"),
    )


def detect_dataset_format(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> DatasetFileFormat:
    """``"pt"`` for a torch.save zip of tensors, ``"npz"`` for a numpy archive of numeric arrays; else InvalidDataset."""
    with open_dataset_archive(path, limits) as archive:
        return dataset_format_in(archive, limits).format


@dataclass(frozen=True)
class DetectedDataset:
    format: DatasetFileFormat
    # A .pt archive's data.pkl, already read (within the limits) and scanned: its shapes are
    # read from these bytes, not read again.
    pickle_bytes: bytes | None = None
    prefix: str | None = None


def open_dataset_archive(path: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    """The dataset's zip, its structure checked (entries, sizes, ratios); InvalidDataset if it is not one."""
    head = _read_head(path, 8)
    if not (head.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC))):
        hint = " (a raw or legacy pickle, which cannot be loaded safely)" if _looks_like_pickle(_read_head(path)) else ""
        raise InvalidDataset(
            f"the dataset is not a torch.save .pt archive or a numpy .npz{hint}; "
            "save it with torch.save({'inputs': x, 'targets': y}, f) or numpy.savez(f, inputs=x, targets=y)"
        )
    archive = open_zip(path, InvalidDataset, limits)
    try:
        check_zip_archive(archive, limits, file_size=path.stat().st_size, single_prefix=False, error=InvalidDataset)
    except BaseException:
        archive.close()
        raise
    return archive


def dataset_format_in(archive: zipfile.ZipFile, limits: ArchiveLimits) -> DetectedDataset:
    """Which dataset format an open, checked archive holds (``open_dataset_archive``)."""
    names = archive.namelist()
    if all(name.endswith(".npy") for name in names):
        for name in names:
            info = archive.getinfo(name)
            head_bytes = read_entry_head(archive, name, limits.max_npy_header_bytes)
            parse_npy_header(head_bytes, info.file_size, name)
        if "inputs.npy" not in names:
            shown = ", ".join(sorted(name[: -len(".npy")] for name in names)[:5])
            raise InvalidDataset(f"the .npz has no 'inputs' array (it has: {shown})")
        return DetectedDataset("npz")
    prefix = single_top_level_prefix(names, InvalidDataset)
    if any(name.startswith(f"{prefix}/code/") for name in names):
        raise InvalidDataset("this is a TorchScript model archive, not a dataset")
    if f"{prefix}/data.pkl" not in names:
        raise InvalidDataset("the zip archive is neither a torch.save .pt nor a numpy .npz")
    pickle_bytes = read_entry(archive, f"{prefix}/data.pkl", min(limits.max_pickle_bytes, limits.max_dataset_pickle_bytes), InvalidDataset)
    _refuse_unsafe_pickle(
        pickle_bytes,
        damaged=lambda why: InvalidDataset(f"the dataset's data.pkl is damaged: {why}"),
        unsafe=lambda globals_: InvalidDataset(
            f"the dataset pickles {globals_}, which cannot be loaded without arbitrary unpickling; "
            "save a plain dict of tensors: torch.save({'inputs': x, 'targets': y}, f)"
        ),
    )
    return DetectedDataset("pt", pickle_bytes=pickle_bytes, prefix=prefix)


def check_declared_format(declared: str, detected: str) -> None:
    """A declared ``spec.model.format`` (other than "auto") must match what the bytes are."""
    if declared != "auto" and declared != detected:
        raise InvalidSpec(
            f"spec.model.format says {declared!r} but the uploaded file is {detected!r}; set model.format to 'auto' or to the file's real format",
            field="model.format",
        )
