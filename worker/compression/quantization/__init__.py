"""INT8 quantization: one verb, one handler per mode, registered by name.

    result = quantize(model, spec.quantize, example_inputs=x, calibration=source, ctx=ctx)

``model`` is a float ``nn.Module`` or a ``torch.jit.ScriptModule``; it is never
modified (handlers work on a CPU copy, since INT8 kernels are CPU kernels).
``calibration`` is a BatchSource of real inputs. The result names every
Conv/Linear layer left in FP32 and why, so a report never calls a model INT8
where it is not.

A new mode is its facts in ``compactor/catalogue.py``, a spec section in
``compactor/spec.py``, one module that defines a handler with the ``Quantizer``
signature and one ``register_quantizer`` line at the bottom of this file.
Every call into ``torch.ao.quantization`` lives in ``ao_backend``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from compactor.catalogue import QUANT_MODES
from compactor.errors import CompactorError, CompressionFailed, InvalidSpec
from compactor.jobs import Stage
from compactor.spec import QuantizeSpec
from worker.compression.context import BatchSource, RunContext

STAGE = Stage.quantize

_Section_contra = TypeVar("_Section_contra", contravariant=True)


@dataclass
class QuantizationResult:
    model: nn.Module
    mode: str
    backend: str
    # One entry per Conv/Linear/RNN layer still computing in FP32:
    # {"name", "type", "reason"}.
    float_layers: list[dict[str, str]] = field(default_factory=list)
    calibration_batches_used: int = 0
    # Which route produced the model, e.g. "fx", "fx_per_submodule", "torchscript_graph", "eager".
    method: str = ""

    @property
    def runs_on(self) -> torch.device:
        """Where the INT8 model runs (its kernels exist only there): evaluate and benchmark it there."""
        return torch.device(QUANT_MODES[self.mode].runs_on[0])


class Quantizer(Protocol[_Section_contra]):
    """A mode's handler; it takes its own mode's spec section (``StaticQuantizeSpec`` …)."""

    def __call__(
        self,
        model: nn.Module,
        spec: _Section_contra,
        *,
        example_inputs: torch.Tensor,
        calibration: BatchSource,
        ctx: RunContext,
    ) -> QuantizationResult: ...


_QUANTIZERS: dict[str, Quantizer[Any]] = {}


def register_quantizer(mode: str, handler: Quantizer[Any]) -> Quantizer[Any]:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not declared in compactor.catalogue.QUANT_MODES")
    if mode in _QUANTIZERS and _QUANTIZERS[mode] is not handler:
        raise ValueError(f"quantization mode {mode!r} is already registered")
    _QUANTIZERS[mode] = handler
    return handler


def get_quantizer(mode: str) -> Quantizer[Any]:
    try:
        return _QUANTIZERS[mode]
    except KeyError:
        raise InvalidSpec(f"unknown quantization mode {mode!r}; available: {sorted(_QUANTIZERS)}", field="quantize.mode") from None


def available_modes() -> list[str]:
    return sorted(_QUANTIZERS)


def quantize(
    model: nn.Module,
    spec: QuantizeSpec,
    *,
    example_inputs: torch.Tensor,
    calibration: BatchSource,
    ctx: RunContext,
) -> QuantizationResult:
    """Quantize a copy of ``model`` to INT8 as ``spec`` says; raises CompactorError subclasses only."""
    handler = get_quantizer(spec.mode)
    ctx.report(STAGE, 0.0)
    try:
        result = handler(model, spec, example_inputs=example_inputs, calibration=calibration, ctx=ctx)
    except CompactorError:
        raise
    except Exception as error:  # a torch internals failure must become a job error, not a traceback
        raise CompressionFailed(f"{spec.mode} INT8 quantization failed: {type(error).__name__}: {error}") from error
    ctx.report(STAGE, 1.0)
    return result


# --- helpers shared by the mode handlers -------------------------------------------------

# Layers whose compute dominates and whose precision the report must account for.
WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    nn.LSTMCell,
    nn.GRUCell,
    nn.RNNCell,
)

_FLOAT_GRAPH_OPS: frozenset[str] = frozenset(
    {
        "aten::conv1d",
        "aten::conv2d",
        "aten::conv3d",
        "aten::_convolution",
        "aten::convolution",
        "aten::conv_transpose1d",
        "aten::conv_transpose2d",
        "aten::conv_transpose3d",
        "aten::linear",
        "aten::lstm",
        "aten::gru",
        "aten::rnn_tanh",
        "aten::rnn_relu",
        "aten::lstm_cell",
        "aten::gru_cell",
    }
)


def float_weighted_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified name, class name) of every float Conv/Linear/RNN module left in an eager or FX model."""
    return [(name, type(module).__name__) for name, module in model.named_modules() if isinstance(module, WEIGHTED_LAYER_TYPES)]


def float_ops_in_graph(module: torch.jit.ScriptModule) -> list[tuple[str, str]]:
    """(location, op kind) of every float conv/linear/RNN op left in a TorchScript module's inlined forward.

    Graph-mode quantization inlines submodules, so layers are named by the
    tracer's scope where there is one, else by op kind and position.
    """
    found: list[tuple[str, str]] = []
    for index, node in enumerate(_all_nodes(module)):
        kind = node.kind()
        if kind in _FLOAT_GRAPH_OPS:
            scope = node.scopeName().replace("__module.", "")
            location = scope.split("/")[-1] if scope else f"{kind.split('::')[1]}@{index}"
            found.append((location, kind))
    return found


def _all_nodes(module: torch.jit.ScriptModule) -> list[torch._C.Node]:
    """Every node of the inlined forward graph, nested blocks (if/loop bodies) included, in order."""
    graph = module.inlined_graph if hasattr(module, "inlined_graph") else module.graph
    nodes: list[torch._C.Node] = []

    def walk(block_nodes: Any) -> None:
        for node in block_nodes:
            nodes.append(node)
            for block in node.blocks():
                walk(block.nodes())

    walk(graph.nodes())
    return nodes


def torchscript_has_int8_ops(module: torch.jit.ScriptModule) -> bool:
    return any(node.kind().startswith("quantized::") for node in _all_nodes(module))


def describe_float_layers(layers: list[tuple[str, str]], reason: str) -> list[dict[str, Any]]:
    return [{"name": name, "type": layer_type, "reason": reason} for name, layer_type in layers]


# Registration: one line per mode. These imports sit at the bottom because the
# mode modules use the types defined above.
from worker.compression.quantization import dynamic as _dynamic  # noqa: E402
from worker.compression.quantization import static as _static  # noqa: E402

register_quantizer("static", _static.quantize_static)
register_quantizer("dynamic", _dynamic.quantize_dynamic)

__all__ = [
    "QuantizationResult",
    "Quantizer",
    "available_modes",
    "get_quantizer",
    "quantize",
    "register_quantizer",
]
