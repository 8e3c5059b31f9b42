"""The job's report: what was done and what it measured, before and after.

Built once per job from the kept trial and the frame's measurements; it becomes
``report.json`` and the job document's ``metrics``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.compression import measure
from worker.compression.runtimes import ORIGINAL, add_speedups, recommend
from worker.compression.trial import Trial, Workbench


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 6)


@dataclass
class Measurements:
    """What the frame measured of the original and of the kept trial, for the report."""

    original_accuracy: dict[str, float] | None
    original_size_bytes: int
    compressed_size_bytes: int
    # measure_runtimes's rows: the original and every artifact, each in its runtime.
    runtimes: list[dict[str, Any]]
    cuda_latency: dict[str, Any]
    fidelity: dict[str, float]
    search: dict[str, Any] | None
    export_check: dict[str, Any] | None
    threads: int
    num_classes: int
    model_format: str
    # How the architecture was recovered (a graph's rebuilt layers, a failed conversion), and why.
    structure: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # Every artifact's reload check by artifact name (model.ts's is also ``export_check``).
    artifact_checks: dict[str, Any] = field(default_factory=dict)


def _slower_warning(recommended: dict[str, Any], best_original: dict[str, float]) -> str | None:
    slower = [
        f"batch {key.removeprefix('batch_')} (the fastest artifact, {choice['artifact']} in {choice['runtime']}, "
        f"{choice['p50_ms']:.3f} ms p50, against the original's {best_original[key]:.3f} ms)"
        for key, choice in recommended.items()
        if choice["speedup"] is not None and choice["speedup"] < 1.0
    ]
    if not slower:
        return None
    return (
        "nothing faster than the original was found at "
        + " and ".join(slower)
        + " on this CPU: deploy the original for speed at that batch size; INT8 and pruning overheads "
        "can outweigh their savings on small inputs and depthwise layers"
    )


def build_report(bench: Workbench, module: nn.Module, trial: Trial, measured: Measurements) -> dict[str, Any]:
    """The job's report (``report.json``, the job document's ``metrics``)."""
    spec = bench.spec
    example = bench.example
    ctx = bench.ctx
    original_accuracy = measured.original_accuracy
    cuda_latency = measured.cuda_latency
    runtimes = measured.runtimes
    best_original = add_speedups(runtimes)
    # original/compressed latency_ms stay TorchScript's (model.ts against the original compiled alike).
    latency = {
        "original": next(row["latency_ms"] for row in runtimes if row["model"] == ORIGINAL and row["runtime"] == "torchscript"),
        "compressed": next(row["latency_ms"] for row in runtimes if row["artifact"] == "model.ts"),
    }
    recommended = recommend(
        runtimes,
        original_top1=original_accuracy["top1"] if original_accuracy else None,
        max_accuracy_drop=spec.target.max_accuracy_drop if spec.target is not None else None,
    )
    params, nonzero = measure.count_parameters(module)
    c_params, c_nonzero = measure.count_parameters(trial.float_model)
    macs_original = measure.count_macs(module, example)
    macs_compressed = measure.count_macs(trial.float_model, example)
    size_original = measured.original_size_bytes
    size_compressed = measured.compressed_size_bytes

    def latency_block(name: str) -> dict[str, Any]:
        block: dict[str, Any] = {"cpu": latency[name]}
        if name in cuda_latency:
            block["cuda"] = cuda_latency[name]
        return block

    original = {
        "params": params,
        "nonzero_params": nonzero,
        "size_bytes": size_original,
        "macs": macs_original,
        "latency_ms": latency_block("original"),
        "accuracy": original_accuracy,
    }
    compressed = {
        "params": c_params,
        "nonzero_params": c_nonzero,
        "size_bytes": size_compressed,
        "macs": macs_compressed,
        "latency_ms": latency_block("compressed"),
        "accuracy": trial.accuracy,
    }
    ratios: dict[str, Any] = {
        "size": _ratio(size_compressed, size_original),
        "params": _ratio(c_params, params),
        "nonzero_params": _ratio(c_nonzero, nonzero),
        "macs": _ratio(macs_compressed, macs_original),
    }
    warnings = list(ctx.warnings)
    for key, choice in recommended.items():
        batch = key.removeprefix("batch_")
        ratios[f"speedup_batch_{batch}"] = choice["speedup"]
        ratios[f"speedup_same_runtime_batch_{batch}"] = choice["speedup_same_runtime"]
    slower = _slower_warning(recommended, best_original)
    if slower is not None:
        # First, and plainly: nobody should deploy a model slower than the one uploaded unknowingly.
        warnings.insert(0, slower)

    notes: list[str] = list(measured.notes)
    if spec.prune is not None and spec.prune.granularity == "unstructured":
        notes.append(
            "Unstructured pruning zeroes weights but keeps dense tensors: the file size, MACs and dense-kernel "
            "latency do not shrink from it; nonzero_params shows the sparsity, which pays off only with sparse "
            "storage or sparse kernels."
        )
    if original_accuracy is None:
        notes.append(
            "No accuracy: "
            + (
                "no dataset was uploaded, so calibration and benchmarks used random inputs."
                if bench.data.synthetic
                else "the dataset has no targets."
            )
            + " fidelity compares the compressed model's outputs with the original's instead."
        )

    after = {row["name"]: row for row in measure.layer_stats(trial.float_model)}
    layers = []
    for row in measure.layer_stats(module):
        name = row["name"]
        current = after.get(name, row)
        entry = {
            "name": name,
            "type": row["type"],
            "params": current["params"],
            "sparsity": current["sparsity"],
        }
        if spec.prune is not None and spec.prune.granularity == "channel":
            entry["channels_before"] = row["out_channels"]
            entry["channels_after"] = current["out_channels"]
        layers.append(entry)

    report: dict[str, Any] = {
        "original": original,
        "compressed": compressed,
        "ratios": ratios,
        "fidelity": measured.fidelity,
        "runtimes": runtimes,
        "recommended": recommended,
        "layers": layers,
        "stages": bench.clock.as_list(),
        "search": measured.search,
        "prune": None if spec.prune is None else {"amount": trial.amount, "granularity": spec.prune.granularity, "criterion": spec.prune.criterion},
        "finetune": trial.finetune,
        "quantization": trial.quantization,
        "export_check": measured.export_check,
        "artifact_checks": measured.artifact_checks,
        "environment": {
            "torch": torch.__version__,
            "device": str(ctx.device),
            "cuda_device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else None,
            "quantization_backend": trial.quantization["backend"] if trial.quantization else None,
            "cpu_threads": measured.threads,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "input_shape": bench.input_shape,
            "num_classes": measured.num_classes,
            "model_format": measured.model_format,
            "structure": measured.structure,
            "dataset": {
                "synthetic": bench.data.synthetic,
                "train_samples": len(bench.data.train.inputs),
                "val_samples": len(bench.data.val.inputs),
            },
        },
        "warnings": warnings,
        "notes": notes,
    }
    return report
