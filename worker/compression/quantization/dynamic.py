"""Dynamic INT8: INT8 weights for Linear/LSTM/GRU layers, activations quantized on the fly.

No calibration data is needed (activation ranges are measured per batch at run
time). Convolutions have no dynamic INT8 kernel, so they stay FP32 and are named
in ``float_layers``; mode ``static`` quantizes them.

- ``nn.Module``: eager ``quantize_dynamic`` (Linear, LSTM, GRU and their cells).
- ``torch.jit.ScriptModule``: TorchScript graph-mode ``quantize_dynamic_jit``,
  which covers ``aten::linear`` only; recurrent ops stay FP32 and are named.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.errors import UnsupportedCombination
from compactor.spec import DynamicQuantizeSpec
from worker.compression.context import BatchSource, RunContext
from worker.compression.quantization import (
    QuantizationResult,
    ao_backend,
    float_ops_in_graph,
    float_weighted_layers,
    torchscript_has_int8_ops,
)

_CONV_REASON = "dynamic quantization has no INT8 kernel for convolutions; use quantize.mode 'static' to quantize them"
_NOTHING_TO_QUANTIZE = (
    "dynamic INT8 quantization found no Linear/LSTM/GRU layer to quantize in this model; use quantize.mode 'static' for convolutional models"
)


def quantize_dynamic(
    model: nn.Module,
    spec: DynamicQuantizeSpec,
    *,
    example_inputs: torch.Tensor,
    calibration: BatchSource,
    ctx: RunContext,
) -> QuantizationResult:
    example = example_inputs.detach().to("cpu")
    with ao_backend.quantized_engine(spec.backend):
        if isinstance(model, torch.jit.ScriptModule):
            converted: nn.Module = ao_backend.jit_quantize_dynamic(model, spec.per_channel)
            if not torchscript_has_int8_ops(converted):
                raise UnsupportedCombination(_NOTHING_TO_QUANTIZE, field="quantize.mode")
            float_layers = [
                {"name": name, "type": kind, "reason": _graph_reason(kind)}
                for name, kind in float_ops_in_graph(converted)  # type: ignore[arg-type]
            ]
            method = "torchscript_graph"
        else:
            converted = ao_backend.eager_quantize_dynamic(model, spec.per_channel)
            if not any(ao_backend.is_quantized_module(module) for module in converted.modules()):
                raise UnsupportedCombination(_NOTHING_TO_QUANTIZE, field="quantize.mode")
            float_layers = [
                {"name": name, "type": layer_type, "reason": _module_reason(layer_type)} for name, layer_type in float_weighted_layers(converted)
            ]
            method = "eager"
        with ao_backend.quiet_ao(), torch.no_grad():
            converted(example)
    return QuantizationResult(
        model=converted,
        mode="dynamic",
        backend=spec.backend,
        float_layers=float_layers,
        calibration_batches_used=0,
        method=method,
    )


def _module_reason(layer_type: str) -> str:
    if layer_type.startswith(("Conv", "ConvTranspose")):
        return _CONV_REASON
    return f"dynamic quantization has no INT8 kernel for {layer_type}, so it stays FP32"


def _graph_reason(kind: str) -> str:
    if "conv" in kind:
        return _CONV_REASON
    return f"TorchScript graph-mode dynamic quantization covers aten::linear only; {kind} stays FP32"
