"""The one door to ``torch.ao.quantization``.

Every call into the eager, FX and TorchScript graph-mode quantization APIs and
every switch of ``torch.backends.quantized.engine`` lives here, so that moving
to torchao's PT2E flow later rewrites this file and nothing else. The rest of
the quantization package speaks in plain terms (backend name, per-channel or
not, a model, a calibration loop) and never names an observer.

``torch.ao.quantization`` is deprecated in torch 2.14 but still the only INT8
path that runs on stock CPU kernels without torchao; its deprecation warnings
are silenced here, locally, so they neither flood job logs nor get silenced
process-wide.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from compactor.errors import InvalidSpec

# Layer types that eager dynamic quantization turns into INT8-weight modules.
DYNAMIC_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.LSTM,
    nn.GRU,
    nn.LSTMCell,
    nn.GRUCell,
    nn.RNNCell,
)
# Recurrent layers take a per-tensor weight qconfig: their dynamic INT8
# kernels pack whole gate matrices.
_RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)

# Module namespaces whose classes hold INT8 weights (static, dynamic, fused).
_QUANTIZED_MODULE_PREFIXES: tuple[str, ...] = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "torch.nn.intrinsic.quantized",
)

SUPPORTED_BACKENDS: tuple[str, ...] = ("x86", "qnnpack")


@contextlib.contextmanager
def quiet_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation chatter (and torch.jit's, which graph mode calls) inside the block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..*deprecated.*")
        # convert_jit moves the module to CPU, and Module._apply reads .grad of
        # TorchScript's non-leaf parameter views.
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*\.grad attribute of a Tensor that is not a leaf.*")
        yield


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run the block with ``backend`` as the quantized engine, restoring the previous one after.

    Packed INT8 weights are laid out for the engine active when they are
    packed, so calibration, conversion and INT8 timing all run inside this.
    """
    if backend not in SUPPORTED_BACKENDS:
        raise InvalidSpec(f"unknown quantization backend {backend!r}; use one of {list(SUPPORTED_BACKENDS)}", field="quantize.backend")
    supported = torch.backends.quantized.supported_engines
    if backend not in supported:
        raise InvalidSpec(
            f"this torch build has no {backend!r} INT8 engine (it has {supported}); choose another quantize.backend",
            field="quantize.backend",
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def current_engine() -> str:
    return str(torch.backends.quantized.engine)


def _static_qconfig(backend: str, per_channel: bool) -> torch.ao.quantization.QConfig:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import (
        HistogramObserver,
        default_per_channel_weight_observer,
        default_weight_observer,
    )

    # x86 (fbgemm/oneDNN) kernels can saturate 16-bit intermediate sums on CPUs
    # without VNNI unless activations use 7 bits; qnnpack has no such limit.
    activation = HistogramObserver.with_args(reduce_range=(backend == "x86"))
    weight = default_per_channel_weight_observer if per_channel else default_weight_observer
    return QConfig(activation=activation, weight=weight)


def static_qconfig_mapping(backend: str, per_channel: bool) -> torch.ao.quantization.QConfigMapping:
    """The backend's default mapping (fixed-qparam ops, per-tensor transposed convs) with our global qconfig."""
    from torch.ao.quantization import get_default_qconfig_mapping

    with quiet_ao():
        return get_default_qconfig_mapping(backend).set_global(_static_qconfig(backend, per_channel))


def fx_prepare_static(model: nn.Module, backend: str, per_channel: bool, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (eval mode, CPU), fuse conv+bn(+relu) and insert observers.

    Raises whatever FX raises when the model is not symbolically traceable;
    callers decide how to fall back.
    """
    from torch.ao.quantization.quantize_fx import prepare_fx

    with quiet_ao():
        return prepare_fx(model.eval(), static_qconfig_mapping(backend, per_channel), example_inputs)


def fx_convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet_ao():
        return convert_fx(prepared)


def jit_prepare_static(module: torch.jit.ScriptModule, backend: str, per_channel: bool) -> torch.jit.ScriptModule:
    """TorchScript graph mode: fold conv+bn and insert observers into a copy of ``module``."""
    from torch.ao.quantization import prepare_jit

    with quiet_ao():
        prepared = prepare_jit(module.eval(), {"": _static_qconfig(backend, per_channel)}, inplace=False)
        # Calibration feeds CPU batches; INT8 kernels are CPU kernels anyway.
        if any(tensor.device.type != "cpu" for tensor in [*prepared.parameters(), *prepared.buffers()]):
            prepared.cpu()
        return prepared


def jit_convert_static(prepared: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Replace observed float ops by INT8 ones, then clean up the graph as ``quantize_jit`` does."""
    from torch.ao.quantization import convert_jit

    with quiet_ao():
        # inplace: prepare_jit already copied the caller's module.
        converted = convert_jit(prepared, inplace=True)
        torch._C._jit_pass_constant_propagation(converted.graph)
        torch._C._jit_pass_dce(converted.graph)
        return converted


def _dynamic_qconfigs(per_channel: bool) -> dict[type[nn.Module], torch.ao.quantization.QConfig]:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    linear_qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    return {
        layer_type: (default_dynamic_qconfig if issubclass(layer_type, _RECURRENT_TYPES) else linear_qconfig) for layer_type in DYNAMIC_LAYER_TYPES
    }


def eager_quantize_dynamic(model: nn.Module, per_channel: bool) -> nn.Module:
    """INT8 weights for every Linear/LSTM/GRU(-cell) of a CPU copy of ``model``; activations quantized at run time."""
    from torch.ao.quantization import quantize_dynamic

    with quiet_ao():
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), qconfig_spec=_dynamic_qconfigs(per_channel), dtype=torch.qint8)


def jit_quantize_dynamic(module: torch.jit.ScriptModule, per_channel: bool) -> torch.jit.ScriptModule:
    """TorchScript graph-mode dynamic quantization (covers ``aten::linear`` only)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic_jit

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with quiet_ao():
        return quantize_dynamic_jit(module.eval(), {"": qconfig}, inplace=False)


def is_quantized_module(module: nn.Module) -> bool:
    """True for modules that hold INT8 weights (static, dynamic or fused quantized modules)."""
    return type(module).__module__.startswith(_QUANTIZED_MODULE_PREFIXES)
