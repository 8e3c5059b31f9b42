"""Measured numbers for the report: parameters, size, MACs, latency, accuracy, fidelity, per-layer stats.

Every function takes models and data as they are (an ``nn.Module``, a
``torch.jit.ScriptModule`` or any callable, and a BatchSource), never paths, and
leaves the model as it found it (training flags restored).

What the numbers mean:
- ``count_parameters`` counts stored weights; unstructured sparsity shows up
  only in the nonzero count: dense kernels and the TorchScript size do not get
  smaller from zeros.
- ``count_macs`` counts multiply-accumulates of float conv/matmul ops per
  sample. The MACs of an INT8 model are those of its float version (count the
  model before quantizing it): INT8 kernels do the same multiply-accumulates
  in a cheaper number format.
- ``measure_latency`` reports wall-clock percentiles of models timed in the
  same process, interleaved round by round, at one fixed thread count.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compactor.errors import CompressionFailed, InvalidDataset, InvalidSpec
from worker.compression.context import BatchSource
from worker.compression.quantization.ao_backend import is_quantized_module
from worker.compression.quantization.ao_backend import quantized_engine as quantized_engine_context

# Layers reported by layer_stats (the ones pruning acts on).
_CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_LAYER_TYPE_NAMES: frozenset[str] = frozenset({cls.__name__ for cls in (*_CONV_TYPES, nn.Linear)})


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; restore every submodule's own training flag after."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules() if hasattr(module, "training")]
    model.eval()
    try:
        yield
    finally:
        # modules() is pre-order: a parent's train() resets its children, which are restored after it.
        for module, was_training in flags:
            module.train(was_training)


def _logits(output: Any) -> torch.Tensor:
    """The classification logits of a model output (a tensor, or the first tensor of a tuple/list/dict)."""
    if isinstance(output, torch.Tensor):
        tensor = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        tensor = output[0]
    elif isinstance(output, dict) and output and isinstance(next(iter(output.values())), torch.Tensor):
        tensor = next(iter(output.values()))
    else:
        raise CompressionFailed(f"the model returned {type(output).__name__}, not a tensor of logits")
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    return tensor.float()


# --- size and counts ---------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a float nn.Module or a ScriptModule.

    INT8 weights of quantized Conv/Linear modules are counted too. A frozen
    ScriptModule has no parameters left (they became graph constants), so its
    floating-point tensor constants are counted instead; batch-norm
    statistics folded into conv weights then no longer appear separately.
    """
    total = 0
    nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int(torch.count_nonzero(parameter.detach()).item())
    if not isinstance(model, torch.jit.ScriptModule):
        for module in model.modules():
            if is_quantized_module(module):
                for tensor in _quantized_module_weights(module):
                    total += tensor.numel()
                    nonzero += int(torch.count_nonzero(tensor).item())
    elif total == 0:
        for tensor in _graph_tensor_constants(model):
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor).item())
    return total, nonzero


def _quantized_module_weights(module: nn.Module) -> list[torch.Tensor]:
    """Dequantized weight and bias of an INT8 Conv/Linear module (they live in packed params, not parameters)."""
    tensors: list[torch.Tensor] = []
    for accessor in ("weight", "bias"):
        getter = getattr(module, accessor, None)
        if callable(getter):
            value = getter()
            if isinstance(value, torch.Tensor):
                tensors.append(value.dequantize() if value.is_quantized else value.detach())
    return tensors


def _graph_tensor_constants(module: torch.jit.ScriptModule) -> list[torch.Tensor]:
    graph = module.graph
    found: list[torch.Tensor] = []
    for node in graph.findAllNodes("prim::Constant", True):
        output = node.output()
        if not isinstance(output.type(), torch._C.TensorType):
            continue
        value = output.toIValue()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1:
            found.append(value)
    return found


def torchscript_size(module: torch.jit.ScriptModule) -> int:
    """Bytes of ``torch.jit.save(module)``: the size of the deployable artifact."""
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(module, buffer)
    return buffer.getbuffer().nbytes


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # torch 2.14 marks the whole TorchScript API deprecated; it is still the deployable format.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..*deprecated.*")
        yield


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one forward pass on ``example_inputs`` (batch dimension first).

    Counted at the dispatcher (torch.utils.flop_counter), so it covers eager
    modules and ScriptModules alike, and matmuls outside Conv/Linear layers.
    Only float ops are counted: measure an INT8 model's MACs on its float version.
    """
    if example_inputs.dim() < 1 or example_inputs.shape[0] < 1:
        raise InvalidSpec("count_macs needs example inputs with a batch dimension first", field="model.input_shape")
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(example_inputs)
    # The counter reports FLOPs as 2 per multiply-accumulate.
    return int(counter.get_total_flops()) // 2 // int(example_inputs.shape[0])


# --- latency -----------------------------------------------------------------------------


def measure_latency(
    models: dict[str, Callable[[torch.Tensor], Any]],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    device: str | torch.device = "cpu",
    threads: int,
    warmup: int,
    runs: int,
    quantized_engine: str | None = None,
    seed: int = 0,
    budget_s: float | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Latency percentiles in milliseconds: ``{name: {"batch_1": {"p50", "p90", "runs", "iqr_ms"}, ...}}``.

    ``runs`` is the most timed calls per model and batch size. With ``budget_s`` the timing is
    adaptive: a model stops early once it has spent ``budget_s`` seconds at that batch size (after
    at least ``MIN_RUNS_ON_BUDGET`` calls), or once its median is known within
    ``MEDIAN_PRECISION`` (95% confidence, after ``MIN_RUNS_FOR_PRECISION`` calls), and warm-up
    stops at half the budget. A 2.8 s call is then timed 3 times, not 30; a 1 ms call still 30.

    ``input_shape`` is one batch's shape, batch first; the batch dimension is
    replaced by each of ``batch_sizes``. All models see the same random input
    and run back to back in this process, interleaved round by round (the
    order alternating each round), so clock, cache and thermal drift hits all
    of them equally. Models must already be on ``device`` and in eval mode.
    ``quantized_engine`` (the INT8 model's backend) is set for the timing and
    restored after; float models do not use it.
    """
    if not models:
        raise InvalidSpec("measure_latency needs at least one model")
    if threads < 1 or runs < 1 or warmup < 0:
        raise InvalidSpec(f"measure_latency needs threads >= 1, runs >= 1, warmup >= 0 (got {threads}, {runs}, {warmup})")
    if len(input_shape) < 2:
        raise InvalidSpec(f"input_shape must be batch first with at least one more dimension, got {list(input_shape)}", field="model.input_shape")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSpec("latency on cuda was asked for, but no CUDA device is available", field="device")

    def synchronize() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    names = list(models)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    generator = torch.Generator().manual_seed(seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    # Denormal floats can make CPU kernels 10-100x slower and differ between models; flush them to zero.
    torch.set_flush_denormal(True)
    engine = contextlib.nullcontext() if quantized_engine is None else quantized_engine_context(quantized_engine)
    try:
        with engine, torch.inference_mode():
            for batch_size in batch_sizes:
                inputs = torch.randn([int(batch_size), *input_shape[1:]], generator=generator).to(target)
                for name in names:
                    warmup_started = time.perf_counter()
                    for _ in range(warmup):
                        _run_timed_call(models[name], inputs, name, batch_size)
                        synchronize()
                        if budget_s is not None and time.perf_counter() - warmup_started >= budget_s / 2:
                            break
                timings: dict[str, list[float]] = {name: [] for name in names}
                active = list(names)
                round_index = 0
                while active:
                    order = active if round_index % 2 == 0 else active[::-1]
                    for name in order:
                        synchronize()
                        start = time.perf_counter()
                        _run_timed_call(models[name], inputs, name, batch_size)
                        synchronize()
                        timings[name].append((time.perf_counter() - start) * 1000.0)
                    active = [name for name in active if not _timed_enough(timings[name], runs, budget_s)]
                    round_index += 1
                for name in names:
                    samples = np.asarray(timings[name])
                    q25, q75 = np.percentile(samples, [25, 75])
                    results[name][f"batch_{batch_size}"] = {
                        "p50": float(np.percentile(samples, 50)),
                        "p90": float(np.percentile(samples, 90)),
                        "runs": len(samples),
                        "iqr_ms": float(q75 - q25),
                    }
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)
    return results


MIN_RUNS_ON_BUDGET = 3
MIN_RUNS_FOR_PRECISION = 10
MEDIAN_PRECISION = 0.02  # the 95% interval's half-width, as a share of the median
_PRECISION_FLOOR_S = 0.2  # below this much timing, 30 runs cost less than deciding to stop


def _timed_enough(samples_ms: list[float], max_runs: int, budget_s: float | None) -> bool:
    count = len(samples_ms)
    if count >= max_runs:
        return True
    if budget_s is None:
        return False
    spent_s = sum(samples_ms) / 1000.0
    if count >= MIN_RUNS_ON_BUDGET and spent_s >= budget_s:
        return True
    if count < MIN_RUNS_FOR_PRECISION or spent_s < _PRECISION_FLOOR_S:
        return False
    samples = np.asarray(samples_ms)
    median = float(np.median(samples))
    # The median's standard error from the median absolute deviation (robust to the odd slow call).
    half_width = 1.96 * 1.2533 * 1.4826 * float(np.median(np.abs(samples - median))) / np.sqrt(count)
    return half_width <= MEDIAN_PRECISION * median


def _run_timed_call(model: Callable[[torch.Tensor], Any], inputs: torch.Tensor, name: str, batch_size: int) -> None:
    try:
        model(inputs)
    except Exception as error:
        raise CompressionFailed(
            f"model {name!r} failed during latency measurement at batch size {batch_size}: {type(error).__name__}: {error}"
        ) from error


# --- accuracy and fidelity ---------------------------------------------------------------


def evaluate_accuracy(model: Callable[[torch.Tensor], Any], batches: BatchSource, device: str | torch.device) -> dict[str, float] | None:
    """``{"top1", "top5", "samples"}`` as fractions, or None when the batches carry no targets.

    top-5 is top-k with k capped at the number of classes.
    """
    target_device = torch.device(device)
    correct_top1 = 0
    correct_topk = 0
    samples = 0
    saw_unlabelled = False
    with eval_mode(model), torch.inference_mode():
        for inputs, targets in batches():
            if targets is None:
                saw_unlabelled = True
                continue
            if saw_unlabelled:
                raise InvalidDataset("some evaluation batches have targets and some do not")
            logits = _logits(model(inputs.to(target_device)))
            if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
                raise InvalidDataset(
                    f"accuracy needs [batch, classes] logits matching the targets; got logits {list(logits.shape)} for targets {list(targets.shape)}"
                )
            targets = targets.to(logits.device).long()
            num_classes = logits.shape[1]
            if targets.min() < 0 or targets.max() >= num_classes:
                raise InvalidDataset(f"targets must lie in [0, {num_classes}) for a model with {num_classes} outputs")
            k = min(5, num_classes)
            top = logits.topk(k, dim=1).indices
            hits = top == targets.unsqueeze(1)
            correct_top1 += int(hits[:, 0].sum().item())
            correct_topk += int(hits.any(dim=1).sum().item())
            samples += int(targets.shape[0])
    if samples == 0:
        return None
    if saw_unlabelled:
        raise InvalidDataset("some evaluation batches have targets and some do not")
    return {"top1": correct_top1 / samples, "top5": correct_topk / samples, "samples": samples}


def fidelity(
    original: Callable[[torch.Tensor], Any],
    compressed: Callable[[torch.Tensor], Any],
    batches: BatchSource,
    device_original: str | torch.device,
    device_compressed: str | torch.device,
) -> dict[str, float]:
    """How closely ``compressed`` reproduces ``original``: ``{"top1_agreement", "output_cosine", "samples"}``.

    ``output_cosine`` is the mean over samples of the cosine similarity of the
    two flattened logit vectors. Needs no labels.
    """
    first_device = torch.device(device_original)
    second_device = torch.device(device_compressed)
    agreements = 0
    cosine_sum = 0.0
    samples = 0
    with eval_mode(original), eval_mode(compressed), torch.inference_mode():
        for inputs, _targets in batches():
            reference = _logits(original(inputs.to(first_device))).cpu().double()
            candidate = _logits(compressed(inputs.to(second_device))).cpu().double()
            if reference.shape != candidate.shape:
                raise CompressionFailed(
                    f"the compressed model's output shape {list(candidate.shape)} differs from the original's {list(reference.shape)}"
                )
            reference_flat = reference.reshape(reference.shape[0], -1)
            candidate_flat = candidate.reshape(candidate.shape[0], -1)
            cosine = F.cosine_similarity(reference_flat, candidate_flat, dim=1, eps=1e-12)
            # Two identical outputs agree perfectly even when both are all zeros.
            identical = (reference_flat == candidate_flat).all(dim=1)
            cosine = torch.where(identical, torch.ones_like(cosine), cosine)
            cosine_sum += float(cosine.sum().item())
            if reference_flat.shape[1] > 1:
                agreements += int((reference_flat.argmax(1) == candidate_flat.argmax(1)).sum().item())
            else:
                agreements += int(((reference_flat > 0) == (candidate_flat > 0)).sum().item())
            samples += int(reference.shape[0])
    if samples == 0:
        raise InvalidDataset("fidelity needs at least one input batch, and the data yielded none")
    return {"top1_agreement": agreements / samples, "output_cosine": cosine_sum / samples, "samples": samples}


# --- per-layer statistics ----------------------------------------------------------------


def layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per float Conv/Linear layer: name, type, params, nonzero, sparsity, out_channels, in_channels.

    Works on nn.Modules and unfrozen ScriptModules (a frozen one has no layers left to name).
    """
    stats: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        layer_type = _layer_type(module)
        if layer_type is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        bias = getattr(module, "bias", None)
        tensors = [weight.detach()] + ([bias.detach()] if isinstance(bias, torch.Tensor) else [])
        params = sum(tensor.numel() for tensor in tensors)
        nonzero = sum(int(torch.count_nonzero(tensor).item()) for tensor in tensors)
        out_channels, in_channels = _channels(layer_type, module, weight)
        stats.append(
            {
                "name": name,
                "type": layer_type,
                "params": params,
                "nonzero": nonzero,
                "sparsity": 1.0 - nonzero / params if params else 0.0,
                "out_channels": out_channels,
                "in_channels": in_channels,
            }
        )
    return stats


def _layer_type(module: nn.Module) -> str | None:
    if isinstance(module, torch.jit.ScriptModule):
        original = getattr(module, "original_name", None)
        return original if original in _LAYER_TYPE_NAMES else None
    if isinstance(module, (*_CONV_TYPES, nn.Linear)):
        return type(module).__name__
    return None


def _channels(layer_type: str, module: nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    if layer_type == "Linear":
        return int(weight.shape[0]), int(weight.shape[1])
    groups = int(getattr(module, "groups", 1)) if not isinstance(module, torch.jit.ScriptModule) else _script_groups(module)
    if layer_type.startswith("ConvTranspose"):
        # Transposed conv weights are [in, out / groups, ...].
        return int(weight.shape[1]) * groups, int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1]) * groups


def _script_groups(module: torch.jit.ScriptModule) -> int:
    try:
        return int(module.groups)
    except (AttributeError, RuntimeError):
        return 1
