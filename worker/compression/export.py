"""Export: the compressed model as TorchScript (``model.ts``) and as a float state_dict (``model.pt``).

``model.ts`` must load with plain ``torch.jit.load`` and no Compactor code, so
export traces (or scripts, when tracing would bake in a wrong path) and
freezes. Files are written to a temporary name in the target directory and
renamed when complete, so a reader never sees half an artifact; the sha256
returned is that of the bytes on disk.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactor.errors import CompressionFailed
from worker.compression.context import RunContext
from worker.compression.measure import eval_mode
from worker.compression.quantization import ao_backend, torchscript_has_int8_ops

# Trace and eager run the same kernels, so they agree to rounding; freezing
# folds batch norm into conv weights, which moves float results slightly.
_TRACE_RELATIVE_TOLERANCE = 1e-5
_FREEZE_RELATIVE_TOLERANCE = 1e-3
# A reloaded INT8 archive repacks its weights for the current engine, which
# may pick different kernels and round differently by a quantization step.
_FLOAT_RELOAD_RELATIVE_TOLERANCE = 1e-4
_INT8_RELOAD_RELATIVE_TOLERANCE = 2e-2


@dataclass(frozen=True)
class SavedFile:
    path: Path
    size_bytes: int
    sha256: str


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch.export and its TorchScript converter without their warnings and per-dimension WARNING logs."""
    export_log = logging.getLogger("torch._export")
    level = export_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            export_log.setLevel(level)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is still the one format that loads without our code.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantized tensor creation functions.*")
        yield


def _engine(quantized_engine: str | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if quantized_engine is None else ao_backend.quantized_engine(quantized_engine)


def _tensors_of(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.dequantize() if output.is_quantized else output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors_of(item)]
    if isinstance(output, dict):
        return [tensor for key in sorted(output) for tensor in _tensors_of(output[key])]
    return []


def _max_abs_diff(first: Any, second: Any) -> tuple[float, float]:
    """(max |first - second|, max |first|) over all output tensors; inf when the structures differ."""
    first_tensors = _tensors_of(first)
    second_tensors = _tensors_of(second)
    if len(first_tensors) != len(second_tensors) or not first_tensors:
        return float("inf"), 0.0
    worst = 0.0
    scale = 0.0
    for left, right in zip(first_tensors, second_tensors, strict=True):
        if left.shape != right.shape:
            return float("inf"), 0.0
        left_float = left.detach().float().cpu()
        right_float = right.detach().float().cpu()
        worst = max(worst, float((left_float - right_float).abs().max().item()) if left.numel() else 0.0)
        scale = max(scale, float(left_float.abs().max().item()) if left.numel() else 0.0)
    return worst, scale


def _check_inputs(example_inputs: torch.Tensor) -> torch.Tensor:
    """A two-sample batch: catches traces that baked in the batch size or a data-dependent branch."""
    first = example_inputs[:1]
    if not first.is_floating_point():
        return torch.cat([first, first], dim=0)
    # A second, different sample so a branch on the data can go another way.
    second = torch.flip(first, dims=[-1]) * 0.5 + 0.25
    return torch.cat([first, second], dim=0)


def to_torchscript(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    quantized_engine: str | None = None,
    ctx: RunContext | None = None,
) -> torch.jit.ScriptModule:
    """A frozen, eval-mode TorchScript version of ``model`` for deployment.

    Float nn.Modules and FX-quantized GraphModules are traced; when the trace
    warns about data-dependent Python or disagrees with eager execution on a
    two-sample check batch, the model is scripted instead. Models that are
    already ScriptModules are copied and frozen. ``model`` is left unchanged.

    Pass the INT8 model's backend as ``quantized_engine``: freezing repacks
    INT8 weights for the engine active at that moment, and a qnnpack model
    repacked for x86 computes different numbers.
    """
    with _engine(quantized_engine), _quiet_jit(), torch.no_grad():
        if isinstance(model, torch.jit.ScriptModule):
            return _freeze_script_module(model)
        with eval_mode(model):
            scripted = _trace_or_script(model, example_inputs, ctx)
            return _freeze_checked(scripted, model, example_inputs)


def _freeze_script_module(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    if not module._c.hasattr("training"):
        # Already frozen: freezing drops the training attribute from the compiled
        # type (a Python-level .eval() may re-add one, so the C++ side is asked).
        return module
    working = copy.deepcopy(module)
    working.eval()
    try:
        return torch.jit.freeze(working)
    except Exception as error:
        raise CompressionFailed(f"could not freeze the TorchScript module: {type(error).__name__}: {error}") from error


def _trace_or_script(model: nn.Module, example_inputs: torch.Tensor, ctx: RunContext | None) -> torch.jit.ScriptModule:
    check_batch = _check_inputs(example_inputs)
    expected = model(check_batch)
    trace_problem: str | None = None
    traced: torch.jit.ScriptModule | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example_inputs, check_trace=False)
        tracer_warnings = [str(item.message) for item in caught if issubclass(item.category, torch.jit.TracerWarning)]
        difference, scale = _max_abs_diff(expected, traced(check_batch))
        if difference > _TRACE_RELATIVE_TOLERANCE * max(1.0, scale):
            trace_problem = f"the trace disagrees with eager execution on a 2-sample batch (max abs diff {difference:.3g})"
        elif tracer_warnings:
            trace_problem = f"tracing warned: {tracer_warnings[0].splitlines()[0][:200]}"
    except Exception as error:  # noqa: BLE001 - any tracing failure means: script instead
        trace_problem = f"tracing failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        traced = None
    if trace_problem is None and traced is not None:
        return traced

    try:
        scripted = torch.jit.script(model)
        difference, scale = _max_abs_diff(expected, scripted(check_batch))
        if difference > _TRACE_RELATIVE_TOLERANCE * max(1.0, scale):
            raise CompressionFailed(f"the scripted model disagrees with eager execution (max abs diff {difference:.3g})")
        if ctx is not None:
            ctx.warn(f"TorchScript export used torch.jit.script because {trace_problem}")
        return scripted
    except Exception as script_error:
        script_problem = f"{type(script_error).__name__}: {str(script_error).splitlines()[0][:200] if str(script_error) else ''}"
        if traced is not None and trace_problem is not None and trace_problem.startswith("tracing warned"):
            # The trace matched eager on the check batch; the warning may concern a path the data never takes.
            if ctx is not None:
                ctx.warn(f"TorchScript export kept the trace although {trace_problem}; scripting failed ({script_problem})")
            return traced
        raise CompressionFailed(
            f"the model cannot be exported to TorchScript: {trace_problem}, and scripting failed ({script_problem})"
        ) from script_error


def _freeze_checked(scripted: torch.jit.ScriptModule, model: nn.Module, example_inputs: torch.Tensor) -> torch.jit.ScriptModule:
    frozen = torch.jit.freeze(scripted.eval())
    check_batch = _check_inputs(example_inputs)
    difference, scale = _max_abs_diff(model(check_batch), frozen(check_batch))
    if difference > _FREEZE_RELATIVE_TOLERANCE * max(1.0, scale):
        raise CompressionFailed(f"the frozen TorchScript module disagrees with the model (max abs diff {difference:.3g})")
    return frozen


def _write_atomically(path: Path, write: Callable[[Any], None]) -> SavedFile:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = hashlib.sha256()
        with temporary.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        size_bytes = temporary.stat().st_size
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return SavedFile(path=path, size_bytes=size_bytes, sha256=digest.hexdigest())


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable; some filesystems refuse to open directories.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_torchscript(module: torch.jit.ScriptModule, path: str | os.PathLike[str]) -> SavedFile:
    """Write ``module`` with ``torch.jit.save`` to ``path`` atomically; returns its size and sha256."""

    def write(handle: Any) -> None:
        with _quiet_jit():
            torch.jit.save(module, handle)

    return _write_atomically(Path(path), write)


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> SavedFile:
    """Write ``model.state_dict()`` (CPU tensors) with ``torch.save`` atomically; loads with ``weights_only=True``."""
    state = {name: tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor for name, tensor in model.state_dict().items()}
    return _write_atomically(Path(path), lambda handle: torch.save(state, handle))


def verify_reload(
    path: str | os.PathLike[str],
    reference: nn.Module,
    example_inputs: torch.Tensor,
    *,
    quantized_engine: str | None = None,
) -> dict[str, Any]:
    """Reload ``path`` with plain ``torch.jit.load`` and compare it with ``reference`` on ``example_inputs``.

    ``reference`` is the in-memory model that was exported. Returns
    ``{"ok", "max_abs_diff", "tolerance", "quantized"}``; the tolerance is
    relative to the output's magnitude and looser for INT8 archives. Loading
    repacks INT8 weights for the current engine: pass the model's backend as
    ``quantized_engine`` to check the archive as it runs on its target.
    """
    with _engine(quantized_engine), _quiet_jit(), torch.no_grad():
        reloaded = torch.jit.load(str(path), map_location=example_inputs.device)
        quantized = torchscript_has_int8_ops(reloaded)
        with eval_mode(reference):
            expected = reference(example_inputs)
        actual = reloaded(example_inputs)
    difference, scale = _max_abs_diff(expected, actual)
    relative = _INT8_RELOAD_RELATIVE_TOLERANCE if quantized else _FLOAT_RELOAD_RELATIVE_TOLERANCE
    tolerance = relative * max(1.0, scale)
    return {"ok": difference <= tolerance, "max_abs_diff": difference, "tolerance": tolerance, "quantized": quantized}
