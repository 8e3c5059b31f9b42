"""Reading a ``torch.export.save`` archive (``.pt2``) without arbitrary unpickling.

``torch.export.load`` in torch 2.14.1 is not safe on uploads. What ``load_pt2`` →
``_load_exported_programs`` (torch/export/pt2_archive/_package.py) reads:

- ``models/<name>.json``: the graph, JSON into dataclasses; no pickle.
- weights: raw tensor bytes (``torch.as_strided`` over them), or, for payloads flagged
  ``use_pickle``, an unrestricted unpickling (the weights-only mode turned off);
- constants: the same for tensors; ``custom_obj_*`` through ``torch._C._pickle_load_obj``
  (TorchBind objects) and ``opaque_obj_*`` through ``pickle.loads``: arbitrary objects;
- sample inputs: ``torch.load(weights_only=True)`` that *falls back* to an unrestricted load when
  it fails (torch/_export/serde/serialize.py, ``deserialize_torch_artifact``).

This reader does what ``_load_exported_programs`` does with the same torch helpers for the
safe parts, and replaces every unpickling with ``torch.load(weights_only=True)`` (torch's
restricted unpickler; no fallback). Custom and opaque objects are refused: a model that needs
them is a program, not data. The archive is checked by the zip guard first, its parameter count
is bounded from the declared shapes before any tensor is built, and the graph's ops are checked
against the allowlist (``graph_check.check_exported_program``) before anything is called.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import (
    ExportedProgramDeserializer,
    _bytes_to_dataclass,
    deserialize_size,
    deserialize_storage_offset,
    deserialize_stride,
)
from torch.export import ExportedProgram
from torch.export.pt2_archive import _package as pt2_package
from torch.export.pt2_archive.constants import (
    CONSTANTS_CONFIG_FILENAME_FORMAT,
    CONSTANTS_DIR,
    MODELS_FILENAME_FORMAT,
    SAMPLE_INPUTS_FILENAME_FORMAT,
    TENSOR_CONSTANT_FILENAME_PREFIX,
    WEIGHTS_CONFIG_FILENAME_FORMAT,
    WEIGHTS_DIR,
)

from compactor.errors import InvalidModel, UnsafeModel
from compactor.formats.zip_guard import check_zip_archive, open_zip
from worker.compression.context import first_line as _first_line
from worker.compression.graph_check import check_exported_program
from worker.compression.loading import LoadLimits, check_parameter_budget

MODEL_NAME = "model"


def load_exported_program(path: Path, limits: LoadLimits | None = None) -> ExportedProgram:
    """The ``ExportedProgram`` a ``torch.export.save`` archive holds, read without arbitrary
    unpickling and with every graph op checked; raises UnsafeModel, InvalidModel or ModelTooLarge."""
    limits = limits or LoadLimits()
    with open_zip(path, InvalidModel, limits.archive) as archive:
        check_zip_archive(archive, limits.archive, file_size=path.stat().st_size, single_prefix=True, error=InvalidModel)
    try:
        reader = pt2_package.PT2ArchiveReader(str(path))
    except (RuntimeError, AssertionError) as error:
        raise InvalidModel(f"the file is not a torch.export archive: {_first_line(error)}") from None
    names = set(reader.get_file_names())
    model_file = MODELS_FILENAME_FORMAT.format(MODEL_NAME)
    if model_file not in names:
        raise InvalidModel(f"the torch.export archive has no {model_file} (was it written by torch.export.save?)")
    try:
        serialized = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(model_file))
        weights_config = _payload_config(reader, WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), names)
        constants_config = _payload_config(reader, CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), names)
    except (KeyError, TypeError, ValueError, AssertionError) as error:
        raise InvalidModel(f"the torch.export archive's program is malformed: {_first_line(error)}") from None
    check_parameter_budget(_declared_elements(weights_config), limits, "the torch.export archive")
    state_dict = _tensors(reader, weights_config, WEIGHTS_DIR, params=True)
    constants = _constants(reader, constants_config)
    sample_inputs = _restricted_load(reader, SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME), names, "sample inputs")
    if not isinstance(sample_inputs, tuple):
        raise InvalidModel("the torch.export archive's sample inputs are not an (args, kwargs) pair")
    try:
        program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, sample_inputs)
    except Exception as error:  # noqa: BLE001 - torch's deserializer raises many types on an inconsistent archive
        raise InvalidModel(f"the torch.export archive cannot be rebuilt: {type(error).__name__}: {_first_line(error)}") from None
    check_exported_program(program)
    return program


def _payload_config(reader: Any, name: str, names: set[str]) -> schema.PayloadConfig:
    if name not in names:
        raise InvalidModel(f"the torch.export archive has no {name} (a legacy or foreign format)")
    config: schema.PayloadConfig = pt2_package._load_payload_config(reader, name)
    return config


def _declared_elements(config: schema.PayloadConfig) -> int:
    """Elements the weights' descriptions declare, counted before any tensor is built."""
    return sum(
        math.prod(max(int(size.as_int), 0) for size in meta.tensor_meta.sizes) for meta in config.config.values() if meta.tensor_meta is not None
    )


def _restricted_load(reader: Any, name: str, names: set[str], what: str) -> Any:
    """``torch.load(weights_only=True)`` of one archive entry: tensors and plain containers only."""
    if name not in names:
        raise InvalidModel(f"the torch.export archive has no {what} ({name})")
    try:
        return torch.load(io.BytesIO(reader.read_bytes(name)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:  # the restricted unpickler refused a global
        raise UnsafeModel(
            f"the torch.export archive's {what} need more than tensors to load ({_first_line(error)}); "
            "an upload is loaded with torch.load(weights_only=True) only"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged entry fails the loader in many ways
        raise InvalidModel(f"the torch.export archive's {what} cannot be read: {_first_line(error)}") from None


def _tensors(reader: Any, config: schema.PayloadConfig, base_dir: str, *, params: bool) -> dict[str, torch.Tensor]:
    """Weights (or tensor constants) as torch's own ``_load_state_dict`` builds them, pickled
    payloads read with the restricted unpickler instead of torch's unrestricted one."""
    try:
        file_map = pt2_package._build_file_map(reader, config, base_dir)
    except (RuntimeError, ValueError, AssertionError, KeyError) as error:
        raise InvalidModel(f"the torch.export archive's tensors are damaged: {_first_line(error)}") from None
    names = set(reader.get_file_names())
    tensors: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        if meta.use_pickle:
            loaded = _restricted_load(reader, f"{base_dir}{meta.path_name}", names, f"tensor {fqn!r}")
            if not isinstance(loaded, torch.Tensor):
                raise UnsafeModel(f"the torch.export archive's {fqn!r} is a {type(loaded).__name__}, not a tensor")
            tensors[fqn] = loaded
            continue
        tensor_meta = meta.tensor_meta
        if tensor_meta is None:
            raise InvalidModel(f"the torch.export archive's {fqn!r} has no tensor description")
        try:
            tensor = torch.as_strided(
                input=file_map[meta.path_name],
                size=deserialize_size(tensor_meta.sizes),
                stride=deserialize_stride(tensor_meta.strides),
                storage_offset=deserialize_storage_offset(tensor_meta.storage_offset),
            )
        except (RuntimeError, KeyError) as error:
            raise InvalidModel(f"the torch.export archive's {fqn!r} does not fit its data: {_first_line(error)}") from None
        tensors[fqn] = torch.nn.Parameter(tensor, requires_grad=tensor_meta.requires_grad) if params and meta.is_param else tensor
    return tensors


def _constants(reader: Any, config: schema.PayloadConfig) -> dict[str, torch.Tensor]:
    for fqn, meta in config.config.items():
        if not meta.path_name.startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
            raise UnsafeModel(
                f"the torch.export archive's constant {fqn!r} is a script or opaque object ({meta.path_name}); "
                "those load through arbitrary unpickling and are not accepted: export a model of tensors and ATen ops"
            )
    return _tensors(reader, config, CONSTANTS_DIR, params=False)
