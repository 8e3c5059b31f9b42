"""Static INT8: weights and activations in INT8, activation ranges calibrated on real data.

Routes, tried in order:
- ``nn.Module``: FX graph mode on the whole model (conv+bn(+relu) fusion happens
  inside ``prepare_fx``).
- ``nn.Module`` that FX cannot trace (data-dependent control flow, unsupported
  Python): the same FX flow applied to each traceable submodule on its own,
  descending into the ones that fail; the untraceable glue stays FP32 and each
  layer it keeps in FP32 is named with the reason.
- ``torch.jit.ScriptModule`` (a TorchScript upload): TorchScript graph mode
  (``prepare_jit``/``convert_jit``, what ``quantize_jit`` does, with our own
  calibration loop so it can report progress and be cancelled).

Calibration, conversion and the sanity run happen on CPU under the requested
quantized engine: INT8 kernels are CPU kernels and packed weights are laid out
for the engine that packs them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactor.errors import CompressionFailed, InvalidDataset
from compactor.spec import StaticQuantizeSpec
from worker.compression.context import BatchSource, RunContext, limited
from worker.compression.quantization import (
    STAGE,
    WEIGHTED_LAYER_TYPES,
    QuantizationResult,
    ao_backend,
    describe_float_layers,
    float_ops_in_graph,
    float_weighted_layers,
    torchscript_has_int8_ops,
)

# Share of the stage's progress spent calibrating; conversion takes the rest.
_CALIBRATION_SHARE = 0.9


def quantize_static(
    model: nn.Module,
    spec: StaticQuantizeSpec,
    *,
    example_inputs: torch.Tensor,
    calibration: BatchSource,
    ctx: RunContext,
) -> QuantizationResult:
    example = example_inputs.detach().to("cpu")
    with ao_backend.quantized_engine(spec.backend):
        if isinstance(model, torch.jit.ScriptModule):
            return _quantize_torchscript(model, spec, example, calibration, ctx)
        return _quantize_module(model, spec, example, calibration, ctx)


def _calibrate(prepared: Callable[..., Any], spec: StaticQuantizeSpec, calibration: BatchSource, ctx: RunContext) -> int:
    used = 0
    with ao_backend.quiet_ao(), torch.no_grad():
        for inputs, _targets in limited(calibration, spec.calibration_batches):
            ctx.check_cancelled()
            try:
                prepared(inputs.to("cpu"))
            except Exception as error:
                raise CompressionFailed(
                    f"calibration forward pass failed on an input batch of shape {list(inputs.shape)}: {type(error).__name__}: {error}"
                ) from error
            used += 1
            ctx.report(STAGE, _CALIBRATION_SHARE * used / spec.calibration_batches)
    if used == 0:
        raise InvalidDataset("static INT8 quantization needs calibration inputs, and the calibration data yielded no batch")
    return used


def _sanity_run(model: Callable[..., Any], example: torch.Tensor) -> None:
    try:
        with ao_backend.quiet_ao(), torch.no_grad():
            model(example)
    except Exception as error:
        raise CompressionFailed(
            f"the INT8 model does not run on the example input of shape {list(example.shape)}: {type(error).__name__}: {error}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# --- nn.Module: FX graph mode ------------------------------------------------------------


def _quantize_module(
    model: nn.Module, spec: StaticQuantizeSpec, example: torch.Tensor, calibration: BatchSource, ctx: RunContext
) -> QuantizationResult:
    # Float parts keep running on CPU inside the INT8 model, so the whole copy moves.
    working = copy.deepcopy(model).cpu().eval()
    untraceable: dict[str, str] = {}
    try:
        prepared: nn.Module = ao_backend.fx_prepare_static(working, spec.backend, spec.per_channel, (example,))
        parts = [""]
        method = "fx"
    except Exception as error:  # FX raises many types (TraceError, TypeError, NotImplementedError, ...)
        ctx.warn(
            f"static INT8: FX could not trace the whole model ({_first_line(error)}); "
            "quantizing its traceable submodules one by one, the rest stays FP32"
        )
        working = copy.deepcopy(model).cpu().eval()
        untraceable[""] = f"FX could not trace it ({_first_line(error)})"
        parts = _prepare_per_submodule(working, example, spec, untraceable)
        if not parts:
            raise CompressionFailed(
                "static INT8 quantization found no part of the model that FX can trace "
                f"({untraceable['']}); try mode 'dynamic', or upload a TorchScript archive to use TorchScript graph mode"
            ) from error
        prepared = working
        method = "fx_per_submodule"

    used = _calibrate(prepared, spec, calibration, ctx)
    ctx.check_cancelled()

    if parts == [""]:
        converted: nn.Module = ao_backend.fx_convert(prepared)  # type: ignore[arg-type]
    else:
        for qualified in parts:
            parent_name, _, child_name = qualified.rpartition(".")
            parent = prepared.get_submodule(parent_name) if parent_name else prepared
            setattr(parent, child_name, ao_backend.fx_convert(getattr(parent, child_name)))
        converted = prepared
    converted.eval()

    if not any(ao_backend.is_quantized_module(module) for module in converted.modules()):
        raise CompressionFailed(
            f"static INT8 quantization on the {spec.backend} backend left every layer in FP32; "
            "the model has no Conv/Linear pattern with an INT8 kernel"
        )
    _sanity_run(converted, example)
    float_layers = [
        {"name": name, "type": layer_type, "reason": _float_reason(name, untraceable, spec.backend)}
        for name, layer_type in float_weighted_layers(converted)
    ]
    return QuantizationResult(
        model=converted,
        mode="static",
        backend=spec.backend,
        float_layers=float_layers,
        calibration_batches_used=used,
        method=method,
    )


def _float_reason(layer_name: str, untraceable: dict[str, str], backend: str) -> str:
    # The deepest untraceable module that contains the layer explains it best.
    enclosing = [prefix for prefix in untraceable if prefix == "" or layer_name == prefix or layer_name.startswith(prefix + ".")]
    if enclosing:
        deepest = max(enclosing, key=len)
        where = f"'{deepest}'" if deepest else "the model's own forward"
        return f"used directly by {where}, which FX could not trace: {untraceable[deepest]}" if deepest != layer_name else untraceable[deepest]
    return f"no INT8 pattern of the {backend} backend matched this layer, so FX left it in FP32"


def _has_weighted_layer(module: nn.Module) -> bool:
    return any(isinstance(sub, WEIGHTED_LAYER_TYPES) for sub in module.modules())


def _capture_child_inputs(module: nn.Module, args: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
    """The positional arguments each direct child receives on its first call when ``module(*args)`` runs."""
    captured: dict[str, tuple[Any, ...]] = {}
    skipped: set[str] = set()
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, hook_args: tuple[Any, ...], hook_kwargs: dict[str, Any]) -> None:
            if hook_kwargs:
                # prepare_fx takes positional example inputs only.
                skipped.add(name)
            elif name not in captured:
                captured[name] = tuple(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in hook_args)

        return hook

    for name, child in module.named_children():
        handles.append(child.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value for name, value in captured.items() if name not in skipped}


def _prepare_per_submodule(root: nn.Module, example: torch.Tensor, spec: StaticQuantizeSpec, untraceable: dict[str, str]) -> list[str]:
    """Replace each traceable submodule that holds weights by its FX-prepared version; returns their names.

    Descends into submodules FX cannot trace, recording why in ``untraceable``.
    """
    prepared_parts: list[str] = []

    def visit(module: nn.Module, prefix: str, args: tuple[Any, ...]) -> None:
        try:
            child_inputs = _capture_child_inputs(module, args)
        except Exception as error:  # noqa: BLE001 - reported per layer, which stays FP32
            untraceable[prefix] = f"its forward failed on the example input ({_first_line(error)})"
            return
        for name, child in list(module.named_children()):
            qualified = f"{prefix}.{name}" if prefix else name
            if not _has_weighted_layer(child):
                continue
            if name not in child_inputs:
                untraceable[qualified] = "not called (or called with keyword arguments) by its parent on the example input"
                continue
            try:
                prepared_child = ao_backend.fx_prepare_static(child, spec.backend, spec.per_channel, child_inputs[name])
            except Exception as error:  # noqa: BLE001 - FX fails in many ways; the child is retried below
                untraceable[qualified] = f"FX could not trace it ({_first_line(error)})"
                visit(child, qualified, child_inputs[name])
                continue
            setattr(module, name, prepared_child)
            prepared_parts.append(qualified)

    visit(root, "", (example,))
    return prepared_parts


# --- torch.jit.ScriptModule: TorchScript graph mode --------------------------------------


def _quantize_torchscript(
    module: torch.jit.ScriptModule, spec: StaticQuantizeSpec, example: torch.Tensor, calibration: BatchSource, ctx: RunContext
) -> QuantizationResult:
    try:
        prepared = ao_backend.jit_prepare_static(module, spec.backend, spec.per_channel)
    except Exception as error:
        raise CompressionFailed(
            f"TorchScript graph-mode quantization could not prepare this module ({_first_line(error)}); "
            "upload a state_dict with spec.model.arch to use FX graph mode, or use mode 'dynamic'"
        ) from error
    used = _calibrate(prepared, spec, calibration, ctx)
    ctx.check_cancelled()
    try:
        converted = ao_backend.jit_convert_static(prepared)
    except Exception as error:
        raise CompressionFailed(f"TorchScript graph-mode INT8 conversion failed ({_first_line(error)})") from error
    if not torchscript_has_int8_ops(converted):
        raise CompressionFailed(
            "TorchScript graph-mode quantization found no conv/linear op it could make INT8 in this module; "
            "upload a state_dict with spec.model.arch to use FX graph mode"
        )
    _sanity_run(converted, example)
    float_layers = describe_float_layers(
        float_ops_in_graph(converted),
        f"TorchScript graph-mode quantization has no INT8 pattern on the {spec.backend} backend for this op, so it stays FP32",
    )
    return QuantizationResult(
        model=converted,
        mode="static",
        backend=spec.backend,
        float_layers=float_layers,
        calibration_batches_used=used,
        method="torchscript_graph",
    )
