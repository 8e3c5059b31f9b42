"""Loading uploaded models without ever running code from the upload.

* TorchScript archives are programs. Their code text is scanned for ops off the
  allowlist (``compactor.graph_ops``) before ``torch.jit.load`` (which runs a
  module's ``__setstate__``), and every op of every method's graph is checked
  after it, before anything is called. The worker calls :func:`load_model` only
  inside a kernel-confined child process (``worker/sandbox.py``).
* ``torch.save`` state_dicts load with ``torch.load(weights_only=True,
  mmap=True)`` only after :mod:`compactor.formats` has checked the archive and
  the pickle's globals; there is no fallback to unsafe loading on any error.
* safetensors files load with ``safetensors.torch.load_file`` after their
  header has been validated.

Weights-only uploads need ``model.arch``: the architecture is built from
torchvision's classification builders with ``weights=None``, or from timm's
(``timm/<name>``) with ``pretrained=False`` (nothing is ever downloaded), first on the meta device so that the parameter budget and the
fit of every tensor are checked before any real memory is allocated.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from compactor.catalogue import MODEL_FORMATS
from compactor.errors import (
    SAFE_MODEL_FORMATS_HINT,
    InvalidModel,
    InvalidSpec,
    ModelTooLarge,
    UnsafeModel,
)
from compactor.formats import (
    ArchiveLimits,
    ModelFileFormat,
    check_declared_format,
    detect_model_format,
    read_safetensors_header,
    single_top_level_prefix,
)
from compactor.limits import Limits
from compactor.spec import ModelSpec, fetching_arch_kwargs
from compactor.torchscript_code import check_torchscript_code
from worker.compression.context import first_line as _first_line
from worker.compression.graph_check import check_torchscript
from worker.confinement import is_confined

# Checkpoint dicts from training scripts often wrap the weights under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_SHOWN_KEYS = 5


@dataclass(frozen=True)
class LoadLimits:
    # The defaults are compactor.limits.Limits' (the gateway's); the worker passes the configured ones.
    archive: ArchiveLimits = field(default_factory=lambda: Limits().model_archive)
    # Counts every tensor element (parameters and buffers).
    max_parameters: int = Limits().max_parameters


@dataclass
class LoadedModel:
    module: nn.Module
    format: ModelFileFormat
    scripted: bool
    arch: str | None


def classification_architectures() -> list[str]:
    """Names ``build_architecture`` accepts: torchvision's image classification builders."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_architecture(arch: str, arch_kwargs: Mapping[str, Any], *, device: torch.device | str | None = None) -> nn.Module:
    """A randomly initialised torchvision classifier (``weights=None``) or timm model (``timm/<name>``,
    ``pretrained=False``): nothing is ever downloaded.

    ``device="meta"`` builds it without allocating memory (to count
    parameters and compare shapes); some builders (the regnet family) cannot
    run on meta and raise NotImplementedError there.
    """
    fetching = fetching_arch_kwargs(arch_kwargs)
    if fetching:
        raise InvalidSpec(
            f"weights are uploaded, never downloaded or read from a path: drop {', '.join(map(repr, fetching))}", field="model.arch_kwargs"
        )
    if arch.startswith(TIMM_PREFIX):
        return _call_builder(arch, _timm_builder(arch.removeprefix(TIMM_PREFIX)), arch_kwargs, device)
    names = classification_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=_SHOWN_KEYS, cutoff=0.5) or [
            name for name in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vgg16", "vit_b_16") if name in names
        ]
        raise InvalidSpec(
            f"model.arch {arch!r} is not a torchvision classification model; valid names include {', '.join(close)}",
            field="model.arch",
        )
    return _call_builder(arch, functools.partial(torchvision.models.get_model_builder(arch), weights=None), arch_kwargs, device)


TIMM_PREFIX = "timm/"


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    """timm's builder of ``name`` with ``pretrained=False`` always, so timm never reaches its hub."""
    import timm

    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=_SHOWN_KEYS, cutoff=0.6) or ["resnet18d", "efficientnet_b0", "convnext_atto"]
        raise InvalidSpec(
            f"model.arch 'timm/{name}' is not a timm model; valid names include {', '.join(TIMM_PREFIX + match for match in close)}",
            field="model.arch",
        )
    return functools.partial(timm.create_model, name, pretrained=False)


def _call_builder(arch: str, builder: Callable[..., nn.Module], arch_kwargs: Mapping[str, Any], device: torch.device | str | None) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # googlenet/inception_v3 warn about a future init default; uploaded weights replace it anyway.
            warnings.filterwarnings("ignore", message="The default weight initialization", category=FutureWarning)
            if device is None:
                return builder(**arch_kwargs)
            with torch.device(device):
                return builder(**arch_kwargs)
    except NotImplementedError:
        if device is not None and torch.device(device).type == "meta":
            raise
        raise InvalidSpec(f"{arch} cannot be built with arch_kwargs {dict(arch_kwargs)!r}", field="model.arch_kwargs") from None
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise InvalidSpec(
            f"{arch} cannot be built with arch_kwargs {dict(arch_kwargs)!r}: {_first_line(exc)}",
            field="model.arch_kwargs",
        ) from exc


def load_model(
    path: Path,
    model_spec: ModelSpec,
    limits: LoadLimits = LoadLimits(),
    *,
    trusted_code: bool = False,
    detected_format: str | None = None,
) -> LoadedModel:
    """Detect, validate and load an uploaded model onto the CPU, in eval mode.

    ``detected_format``: the format the caller already detected from these bytes (the worker
    does, to decide on confinement), so the file is not sniffed twice.

    A format whose loading runs the upload's code (``runs_uploaded_code`` in the catalogue:
    TorchScript) loads only in a process confined by ``worker.confinement.confine`` (the
    worker's job child), unless ``trusted_code`` says the caller vouches for it (its own file
    in a notebook or a test, or an operator's explicit COMPACTOR_ALLOW_UNCONFINED_TORCHSCRIPT);
    otherwise UnsafeModel, before torch sees it.

    Raises UnsafeModel, UnsupportedModelFormat, InvalidModel (damaged file,
    NaN/Inf weights, weights that do not fit ``arch``), ModelTooLarge, or
    InvalidSpec (declared format contradicts the file; arch missing or
    unknown; arch_kwargs the builder refuses).
    """
    detected = detected_format or detect_model_format(path, limits.archive)
    check_declared_format(model_spec.format, detected)
    facts = MODEL_FORMATS[detected]
    if facts.runs_uploaded_code and not (trusted_code or is_confined()):
        raise UnsafeModel(
            f"an uploaded {detected} archive is a program and is loaded only inside a confined job process; "
            "run it through the service, or pass trusted_code=True for a file you wrote yourself"
        )
    if facts.needs_arch and model_spec.arch is None:
        raise InvalidSpec(
            f"a {detected} upload holds weights only: set model.arch to the torchvision builder they belong to "
            "(e.g. 'resnet18') and model.arch_kwargs to how it was built (e.g. {'num_classes': 10}), "
            "or upload a TorchScript archive instead",
            field="model.arch",
        )
    module = _READERS[detected](path, model_spec, limits, trusted_code or is_confined())
    return LoadedModel(
        module=module,
        format=detected,
        scripted=isinstance(module, torch.jit.ScriptModule),
        arch=model_spec.arch if facts.needs_arch else None,
    )


def _read_safetensors(path: Path, model_spec: ModelSpec, limits: LoadLimits, code_allowed: bool) -> nn.Module:
    assert model_spec.arch is not None
    header = read_safetensors_header(path, limits.archive)
    check_parameter_budget(sum(entry.numel for entry in header.values()), limits, "the safetensors file")
    return _module_from_state_dict(_load_safetensors(path), model_spec.arch, model_spec.arch_kwargs, limits)


def _read_state_dict(path: Path, model_spec: ModelSpec, limits: LoadLimits, code_allowed: bool) -> nn.Module:
    assert model_spec.arch is not None
    return _module_from_state_dict(_load_state_dict(path, limits), model_spec.arch, model_spec.arch_kwargs, limits)


def _read_torchscript(path: Path, model_spec: ModelSpec, limits: LoadLimits, code_allowed: bool) -> nn.Module:
    return _load_torchscript(path, limits, code_allowed=code_allowed)


def _read_pt2(path: Path, model_spec: ModelSpec, limits: LoadLimits, code_allowed: bool) -> nn.Module:
    from worker.compression.graph_modules import control_flow, rebuild_layer_modules
    from worker.compression.pt2 import load_exported_program

    program = load_exported_program(path, limits)
    flow = control_flow(program.graph_module)
    if flow:
        raise InvalidModel(
            f"the exported program uses data-dependent control flow ({', '.join(flow)}), which Compactor cannot yet compile "
            "into its TorchScript artifact: export the model without torch.cond/while_loop (or upload it as a state_dict)"
        )
    # No guard function in the graph: it checks input shapes with Python ints, and the module is
    # traced again with tensors (TorchScript export, Torch-Pruning); compress() checks the input itself.
    return rebuild_layer_modules(program.module(check_guards=False)).module


# One reader per format of the catalogue (compactor.catalogue.MODEL_FORMATS), same names. The last
# argument says whether this process may run uploaded code (confined, or the caller trusts it).
ModelReader = Callable[[Path, ModelSpec, LoadLimits, bool], nn.Module]
_READERS: dict[str, ModelReader] = {
    "torchscript": _read_torchscript,
    "state_dict": _read_state_dict,
    "safetensors": _read_safetensors,
    "pt2": _read_pt2,
}


def model_readers() -> frozenset[str]:
    return frozenset(_READERS)


# --------------------------------------------------------------- torchscript


def _load_torchscript(path: Path, limits: LoadLimits, *, code_allowed: bool) -> nn.Module:
    # The exact element count needs the archive's pickle; its storage bytes
    # bound it cheaply first (8 bytes per element covers every dtype up to float64).
    with zipfile.ZipFile(path) as archive:
        prefix = single_top_level_prefix(archive.namelist(), InvalidModel)
        storage_bytes = sum(info.file_size for info in archive.infolist() if info.filename.startswith(f"{prefix}/data/"))
    if storage_bytes > 8 * limits.max_parameters:
        raise ModelTooLarge(
            f"the TorchScript archive holds {storage_bytes} bytes of tensors, more than a model of {limits.max_parameters} parameters can need"
        )
    # The archive's code is read (never run) first: loading runs a module's __setstate__.
    check_torchscript_code(path)
    # Checked here too, beside the load itself: load_model refuses earlier from the catalogue's
    # runs_uploaded_code, and this is the one place an upload's program is loaded.
    if not code_allowed:
        raise UnsafeModel("an uploaded TorchScript program is loaded only inside a confined job process")
    try:
        with warnings.catch_warnings():
            # torch 2.14 deprecates TorchScript in favour of torch.export; the API still accepts it.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # any failure of a crafted archive is the upload's fault
        raise InvalidModel(f"the TorchScript archive cannot be loaded: {_first_line(exc)}") from exc
    # Every op of every method, before any of them runs.
    check_torchscript(module)
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    check_parameter_budget(sum(tensor.numel() for tensor in tensors.values()), limits, "the TorchScript model")
    _check_finite(tensors)
    return module.eval()


# ------------------------------------------------------------ weights only


def _load_state_dict(path: Path, limits: LoadLimits) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors stay on disk until used, so the budget check below allocates nothing.
        loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises turning weights-only loading off: never relay that advice.
        raise UnsafeModel(f"the file needs more than weights-only unpickling to load; {SAFE_MODEL_FORMATS_HINT}") from exc
    except Exception as exc:  # torch raises RuntimeError/OSError/EOFError/... on damaged files
        raise InvalidModel(f"the torch.save archive cannot be read: {_first_line(exc)}") from exc
    state_dict = _unwrap_state_dict(loaded)
    check_parameter_budget(sum(tensor.numel() for tensor in state_dict.values()), limits, "the state_dict")
    return state_dict


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise InvalidModel(f"the safetensors file cannot be read: {_first_line(exc)}") from exc


def _unwrap_state_dict(loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping):
        raise InvalidModel(
            f"the file holds a {type(loaded).__name__}, not a state_dict (a mapping of names to tensors); "
            "save it with torch.save(model.state_dict(), f)"
        )
    not_tensors = [f"{key!r} ({type(value).__name__})" for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise InvalidModel(f"a state_dict maps names to tensors, but these entries are not tensors: {_listing(not_tensors)}")
    not_strings = [repr(key) for key in loaded if not isinstance(key, str)]
    if not_strings:
        raise InvalidModel(f"state_dict keys must be strings: {_listing(not_strings)}")
    state_dict: dict[str, torch.Tensor] = OrderedDict(loaded)
    metadata = getattr(loaded, "_metadata", None)
    if metadata is not None:
        # The per-module versions steer BatchNorm's handling of older checkpoints.
        state_dict._metadata = metadata  # type: ignore[attr-defined]
    # Checkpoints saved from nn.DataParallel/DistributedDataParallel prefix every key.
    if state_dict and all(key.startswith("module.") for key in state_dict):
        consume_prefix_in_state_dict_if_present(state_dict, "module.")
    return state_dict


def _module_from_state_dict(state_dict: dict[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any], limits: LoadLimits) -> nn.Module:
    try:
        skeleton: nn.Module | None = build_architecture(arch, arch_kwargs, device="meta")
    except NotImplementedError:
        # A builder that computes on its tensors while initialising (regnet): build for real, check after.
        skeleton = None
    if skeleton is not None:
        check_parameter_budget(_element_count(skeleton), limits, f"{arch} with these arch_kwargs")
        _check_fit(state_dict, skeleton.state_dict(), arch, arch_kwargs)
        module = _materialise(skeleton) if _all_buffers_persistent(skeleton) else build_architecture(arch, arch_kwargs)
    else:
        module = build_architecture(arch, arch_kwargs)
        check_parameter_budget(_element_count(module), limits, f"{arch} with these arch_kwargs")
        _check_fit(state_dict, module.state_dict(), arch, arch_kwargs)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise InvalidModel(f"the weights do not fit {arch} with arch_kwargs {dict(arch_kwargs)!r}: {_first_line(exc)}") from exc
    _check_finite(module.state_dict())
    return module.eval()


def _element_count(module: nn.Module) -> int:
    return sum(tensor.numel() for tensor in module.state_dict().values())


def _all_buffers_persistent(module: nn.Module) -> bool:
    persistent = set(module.state_dict())
    return all(name in persistent for name, _ in module.named_buffers())


def _materialise(skeleton: nn.Module) -> nn.Module:
    """Real CPU memory for a meta-built module, skipping the random init that loading overwrites anyway.

    Only for modules whose every tensor is in the state_dict. Zeroed rather
    than left uninitialised: the one key loading may leave out is BatchNorm's
    ``num_batches_tracked``, whose right default is 0.
    """
    module = skeleton.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.zero_()
    return module


def _check_fit(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any]) -> None:
    """One message naming the missing, unexpected and mis-shaped keys, before anything is allocated."""
    # BatchNorm fills in a missing counter for checkpoints that predate it.
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched: list[str] = []
    for key, want in expected.items():
        got = state_dict.get(key)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            mismatched.append(f"{key} is {list(got.shape)}, {arch} needs {list(want.shape)}")
        elif want.is_floating_point() and not (got.is_floating_point()):
            mismatched.append(f"{key} is {got.dtype}, {arch} needs a floating point tensor")
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise InvalidModel(
            f"the weights do not fit {arch} with arch_kwargs {dict(arch_kwargs)!r} ({'; '.join(problems)}); "
            "check model.arch and model.arch_kwargs (e.g. num_classes) against how the model was built"
        )


def check_parameter_budget(count: int, limits: LoadLimits, what: str) -> None:
    if count > limits.max_parameters:
        raise ModelTooLarge(f"{what} has {count:,} parameters, more than the limit of {limits.max_parameters:,}")


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    bad = [name for name, tensor in tensors.items() if not all_finite(tensor)]
    if bad:
        raise InvalidModel(f"the weights contain NaN or Inf values in {_listing(bad)}; a diverged checkpoint cannot be compressed")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf (integer tensors always are)."""
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    # One pass without a boolean copy, about 5x faster than isfinite().all():
    # min/max propagate NaN, and any Inf becomes the min or the max.
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _listing(items: Iterable[str], shown: int = _SHOWN_KEYS) -> str:
    items = list(items)
    listed = ", ".join(items[:shown])
    return f"{listed} and {len(items) - shown} more" if len(items) > shown else listed


__all__ = [
    "LoadLimits",
    "all_finite",
    "LoadedModel",
    "build_architecture",
    "classification_architectures",
    "load_model",
]
