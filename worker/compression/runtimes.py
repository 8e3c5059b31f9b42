"""The original and every artifact, each in its own runtime, timed side by side; and which to deploy.

A user who skips Compactor exports the original to ONNX and runs it in ONNX Runtime, so the
original is timed both as TorchScript and in ONNX Runtime, and every artifact in the runtime it
is made for (``compactor/catalogue.py`` EXPORTERS ``runtime``): all interleaved in one process
with the same threads and inputs. The recommendation per batch size is the fastest artifact
within the accuracy budget; its speedup over the original in *its* fastest runtime is the job's
headline ("what you gain over deploying the original as well as you can").
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compactor.catalogue import EXPORTERS
from worker.compression import measure
from worker.compression.context import first_line, is_memory_exhaustion
from worker.compression.exporters import Exported
from worker.compression.onnx_runtime import OnnxModel, export_onnx
from worker.compression.trial import Trial, Workbench

ORIGINAL = "original"
# Without an accuracy budget, an artifact within this much top-1 (or agreement) of the best is "as good".
DEFAULT_ACCURACY_SLACK = 0.005


@dataclass
class Candidate:
    """One model in one runtime, as the benchmark runs it."""

    key: str  # "original@torchscript", "model.onnx" ...
    artifact: str | None  # None for the original
    runtime: str
    precision: str
    runnable: Any
    size_bytes: int | None = None


def _precision(facts_precision: str, trial: Trial) -> str:
    if facts_precision == "as_quantized":
        return "int8" if trial.quantization is not None else "fp32"
    return facts_precision


def artifact_candidates(trial: Trial, exported: dict[str, Exported]) -> list[Candidate]:
    by_artifact = {facts.artifact: facts for facts in EXPORTERS.values()}
    candidates = []
    for artifact, result in exported.items():
        facts = by_artifact[artifact]
        if facts.runtime is None or result.runnable is None:
            continue
        candidates.append(Candidate(artifact, artifact, facts.runtime, _precision(facts.precision, trial), result.runnable, result.saved.size_bytes))
    return candidates


def original_candidates(bench: Workbench, original_ts: torch.jit.ScriptModule, scratch: Path, threads: int, *, onnx: bool) -> list[Candidate]:
    """The original as TorchScript, and in ONNX Runtime where it exports (a warning where not)."""
    candidates = [Candidate(f"{ORIGINAL}@torchscript", None, "torchscript", "fp32", original_ts, measure.torchscript_size(original_ts))]
    if not onnx:
        return candidates
    try:
        saved = export_onnx(bench.original, bench.example, scratch / "original.onnx")
        candidates.append(Candidate(f"{ORIGINAL}@onnxruntime", None, "onnxruntime", "fp32", OnnxModel(saved.path, threads), saved.size_bytes))
    except Exception as error:  # the original cannot be compared in ONNX Runtime; the rest still is
        if is_memory_exhaustion(error):
            raise
        bench.ctx.warn(f"the original was not timed in ONNX Runtime: it does not export to ONNX ({first_line(error, 240)})")
    return candidates


def _quality(candidate: Candidate, bench: Workbench, trial: Trial) -> dict[str, Any]:
    """Accuracy (where the data has targets) and top-1 agreement with the original, on the validation split."""
    cpu = torch.device("cpu")
    if candidate.artifact == EXPORTERS["torchscript"].artifact and trial.accuracy is not None:
        accuracy: dict[str, float] | None = trial.accuracy  # model.ts is trial.deployable, already evaluated
    else:
        accuracy = bench.evaluate(candidate.runnable, cpu)
    agreement = measure.fidelity(bench.original, candidate.runnable, bench.val_batches(cpu), cpu, cpu)
    return {"accuracy": accuracy, "top1_agreement": agreement["top1_agreement"]}


def measure_runtimes(
    bench: Workbench,
    trial: Trial,
    original_ts: torch.jit.ScriptModule,
    exported: dict[str, Exported],
    *,
    batch_sizes: tuple[int, ...],
    threads: int,
    warmup: int,
    runs: int,
    budget_s: float | None,
    quantized_engine: str | None,
    onnx_baseline: bool = True,
) -> list[dict[str, Any]]:
    """One row per model and runtime: latency per batch size, size, accuracy, agreement."""
    with tempfile.TemporaryDirectory(prefix="compactor-runtimes-") as scratch:
        originals = original_candidates(bench, original_ts, Path(scratch), threads, onnx=onnx_baseline)
        candidates = originals + artifact_candidates(trial, exported)
        latency = measure.measure_latency(
            {candidate.key: candidate.runnable for candidate in candidates},
            bench.input_shape,
            batch_sizes=batch_sizes,
            device="cpu",
            threads=threads,
            warmup=warmup,
            runs=runs,
            quantized_engine=quantized_engine,
            budget_s=budget_s,
        )
        rows = []
        for candidate in candidates:
            row: dict[str, Any] = {
                "model": ORIGINAL if candidate.artifact is None else "compressed",
                "artifact": candidate.artifact,
                "runtime": candidate.runtime,
                "precision": candidate.precision,
                "size_bytes": candidate.size_bytes,
                "latency_ms": latency[candidate.key],
            }
            if candidate.artifact is not None:
                row.update(_quality(candidate, bench, trial))
            rows.append(row)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each compressed row's speedups, against the original in the same runtime and in its fastest
    one; returns the original's best p50 per batch key."""
    originals = [row for row in rows if row["model"] == ORIGINAL]
    batches = list(originals[0]["latency_ms"]) if originals else []
    best_original = {batch: min(row["latency_ms"][batch]["p50"] for row in originals) for batch in batches}
    for row in rows:
        if row["model"] == ORIGINAL:
            continue
        same = next((original for original in originals if original["runtime"] == row["runtime"]), None)
        row["speedup_same_runtime"] = {
            batch: (_speedup(same["latency_ms"][batch]["p50"], row["latency_ms"][batch]["p50"]) if same is not None else None) for batch in batches
        }
        row["speedup_vs_best_original"] = {batch: _speedup(best_original[batch], row["latency_ms"][batch]["p50"]) for batch in batches}
    return best_original


def _speedup(baseline_ms: float, candidate_ms: float) -> float | None:
    return round(baseline_ms / candidate_ms, 6) if candidate_ms > 0 else None


def _score(row: dict[str, Any]) -> float | None:
    accuracy = row.get("accuracy")
    if accuracy is not None:
        return float(accuracy["top1"])
    agreement = row.get("top1_agreement")
    return None if agreement is None else float(agreement)


def recommend(rows: list[dict[str, Any]], *, original_top1: float | None, max_accuracy_drop: float | None) -> dict[str, Any]:
    """Per batch key, the fastest compressed artifact within the accuracy budget.

    The budget is ``original_top1 - max_accuracy_drop`` where the job has one, else the best
    artifact's top-1 (or agreement with the original, without targets) less half a point."""
    compressed = [row for row in rows if row["model"] != ORIGINAL]
    if not compressed:
        return {}
    scores = [score for score in (_score(row) for row in compressed) if score is not None]
    if max_accuracy_drop is not None and original_top1 is not None:
        floor: float | None = original_top1 - max_accuracy_drop
    else:
        floor = max(scores) - DEFAULT_ACCURACY_SLACK if scores else None
    eligible = [row for row in compressed if floor is None or (_score(row) or 0.0) >= floor - 1e-9]
    if not eligible:  # nothing meets the budget: the most accurate one, then the fastest of those
        best = max(scores)
        eligible = [row for row in compressed if _score(row) == best]
    recommended: dict[str, Any] = {}
    for batch in compressed[0]["latency_ms"]:
        fastest = min(eligible, key=lambda row: row["latency_ms"][batch]["p50"])
        recommended[batch] = {
            "artifact": fastest["artifact"],
            "runtime": fastest["runtime"],
            "precision": fastest["precision"],
            "p50_ms": fastest["latency_ms"][batch]["p50"],
            "speedup": fastest["speedup_vs_best_original"][batch],
            "speedup_same_runtime": fastest["speedup_same_runtime"][batch],
            "accuracy_floor": floor,
        }
    return recommended
