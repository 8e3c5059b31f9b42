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
    latency: dict[str, Any]
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


def build_report(bench: Workbench, module: nn.Module, trial: Trial, measured: Measurements) -> dict[str, Any]:
    """The job's report (``report.json``, the job document's ``metrics``)."""
    spec = bench.spec
    example = bench.example
    ctx = bench.ctx
    original_accuracy = measured.original_accuracy
    latency, cuda_latency = measured.latency, measured.cuda_latency
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
    for key, values in latency["original"].items():
        batch = key.removeprefix("batch_")
        speedup = _ratio(values["p50"], latency["compressed"][key]["p50"])
        ratios[f"speedup_batch_{batch}"] = speedup
        if speedup is not None and speedup < 1.0:
            warnings.append(
                f"the compressed model is slower than the original at batch {batch} on this CPU "
                f"({latency['compressed'][key]['p50']:.3f} ms vs {values['p50']:.3f} ms p50): "
                "INT8 and pruning overheads can outweigh the savings on small inputs"
            )

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
