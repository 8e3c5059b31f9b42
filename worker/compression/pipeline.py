"""The compression pipeline's frame: check → evaluate the original → passes (or the target
search) → export → measure → report.

``compress`` works on in-memory models and data (usable from a notebook);
``compress_files`` loads an uploaded model and dataset first and writes the
artifacts (``model.ts``, ``report.json``, ``model.pt``) into a directory.
What a trial does is the passes' business (``passes/``), the search is ``search.py``,
the artifacts are the exporters' (``exporters/``) and the report is ``report.py``:
a new stage, method or artifact does not change this file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactor.catalogue import REPORT_ARTIFACT, stage_weight
from compactor.compat import DatasetFacts, check_compatibility
from compactor.errors import InvalidModel, InvalidSpec, UnsupportedCombination
from compactor.jobs import Stage
from compactor.limits import Limits
from compactor.spec import JobSpec
from worker.compression import measure
from worker.compression.context import RunContext, is_memory_exhaustion
from worker.compression.data import DatasetLimits, SplitData, load_dataset, split_dataset, synthetic_data
from worker.compression.export import to_torchscript
from worker.compression.exporters import Exported, exporters_for
from worker.compression.exporters.torchscript import quantized_engine
from worker.compression.graph_convert import GraphConversionFailed, torchscript_to_graph
from worker.compression.graph_modules import rebuilt_layers
from worker.compression.loading import LoadedModel, LoadLimits, load_model
from worker.compression.passes import Segment, build_passes, planned_segments, run_trial
from worker.compression.progress import ProgressPlan
from worker.compression.report import Measurements, build_report
from worker.compression.runtimes import measure_runtimes
from worker.compression.search import search, trial_segments
from worker.compression.trial import StageClock, Trial, Workbench, clone, resolve_device

SYNTHETIC_SAMPLES = 256


@dataclass
class BenchmarkOptions:
    warmup: int = 5
    runs: int = 30
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int | None = None  # None: the process's current torch thread count
    # Seconds of timing per model and batch size before a slow model stops early (None: always ``runs``).
    budget_s: float | None = 1.5
    # Time the original in ONNX Runtime too (the baseline a user who skips Compactor would deploy).
    onnx_baseline: bool = True


@dataclass
class CompressionResult:
    model: nn.Module
    torchscript: torch.jit.ScriptModule
    metrics: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)


def _output_check(model: nn.Module, example: torch.Tensor) -> int:
    try:
        with torch.inference_mode():
            output = model(example)
    except Exception as error:  # a model or input shape problem of the upload, not ours
        if is_memory_exhaustion(error):
            raise  # the job's memory limit, not the input shape
        raise InvalidSpec(
            f"the model failed on an input of shape {list(example.shape)}: {str(error).splitlines()[0][:300]}; "
            "set spec.model.input_shape (or upload a dataset) to match what the model expects",
            field="model.input_shape",
        ) from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise InvalidModel("Compactor compresses classifiers: the model must return one tensor of logits shaped [batch, classes]")
    if not torch.isfinite(output).all():
        raise InvalidModel("the model produces NaN or infinite outputs on the example input")
    return int(output.shape[1])


def _as_graph(module: nn.Module, spec: JobSpec, data: SplitData) -> tuple[nn.Module, dict[str, Any] | None, list[str]]:
    """A TorchScript module as an allowlisted ATen graph with real layers (``graph_convert``), or
    the module as it is with the reason; the structure block of the report either way."""
    rebuilt = rebuilt_layers(module)
    if rebuilt is not None:  # a .pt2 upload: already a graph
        return module, {"graph": "torch.export", **rebuilt}, []
    if not isinstance(module, torch.jit.ScriptModule):
        return module, None, []
    source = data.train.inputs if len(data.train.inputs) >= 2 else data.val.inputs
    try:
        converted = torchscript_to_graph(module, source[:2].clone())
    except GraphConversionFailed as failure:
        if spec.prune is not None and spec.prune.granularity == "channel":
            raise UnsupportedCombination(
                f"channel pruning works on the model's graph, and this TorchScript program could not be converted into one ({failure}): "
                "use prune.granularity 'unstructured', or upload the model as a torch.export archive (.pt2) or a state_dict with model.arch",
                field="prune.granularity",
            ) from None
        note = (
            f"The TorchScript program could not be converted into an ATen graph ({failure}), so its architecture "
            "stays as compiled: channel pruning is not possible on it; unstructured pruning and quantization are."
        )
        return module, {"graph": None, "converted_from": "torchscript", "conversion_failed": str(failure)}, [note]
    return converted.module, {"graph": "torch.export", "converted_from": "torchscript", **(rebuilt_layers(converted.module) or {})}, []


def _progress_plan(spec: JobSpec, has_data: bool) -> list[Segment]:
    if spec.target is not None:
        per_trial = trial_segments(spec, has_data=has_data) * spec.target.max_trials
    else:
        per_trial = planned_segments(build_passes(spec, has_data=has_data))
    after = [Stage.export, Stage.evaluate, Stage.benchmark]
    return [(Stage.evaluate, stage_weight(Stage.evaluate)), *per_trial, *((stage, stage_weight(stage)) for stage in after)]


def compress(
    model: nn.Module | LoadedModel,
    spec: JobSpec,
    data: SplitData | None = None,
    *,
    progress: Callable[[str, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    out_dir: Path | None = None,
    benchmark: BenchmarkOptions | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> CompressionResult:
    """Compress ``model`` as ``spec`` says. ``progress(stage, overall_fraction)`` is monotonic.

    With ``out_dir`` the artifacts (model.ts, report.json and, where the architecture did
    not change, model.pt) are written there and listed in ``result.artifacts``.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.module if loaded is not None else model
    scripted = isinstance(module, torch.jit.ScriptModule)
    if data is None:
        data = synthetic_data(spec.model.input_shape, num_samples=SYNTHETIC_SAMPLES, seed=spec.data.seed)
    started = time.perf_counter()
    module, structure, structure_notes = _as_graph(module, spec, data)
    has_data = not data.synthetic
    benchmark = benchmark or BenchmarkOptions()
    clock = StageClock()
    if stage_seconds:
        clock.seconds.update(stage_seconds)
    if scripted:
        clock.seconds[Stage.load] = clock.seconds.get(Stage.load, 0.0) + time.perf_counter() - started
    plan = ProgressPlan(_progress_plan(spec, has_data), progress)
    ctx = RunContext(device=resolve_device(spec.device), progress=plan.report, should_cancel=should_cancel or (lambda: False))
    # The gateway's own check, on what is known here: one set of rules for the service and notebooks.
    dataset_facts = (
        None
        if not has_data
        else DatasetFacts(format="tensors", num_samples=len(data.train.inputs) + len(data.val.inputs), has_targets=data.has_targets)
    )
    model_format = loaded.format if loaded is not None else ("torchscript" if scripted else None)
    check_compatibility(model_format, spec, dataset_facts, architecture_built=True)

    bench = Workbench(module, spec, data, ctx=ctx, plan=plan, clock=clock)
    example = bench.example
    num_classes = _output_check(module, example)
    if data.has_targets and data.num_classes_seen > num_classes:
        raise InvalidSpec(
            f"the dataset has targets up to {data.num_classes_seen - 1} but the model outputs {num_classes} classes",
            field="model.arch_kwargs",
        )

    with bench.stage(Stage.evaluate):
        original_accuracy = bench.evaluate(bench.original_on(ctx.device), ctx.device)

    search_summary: dict[str, Any] | None = None
    if spec.target is not None:
        assert original_accuracy is not None
        trial, search_summary = search(bench, original_accuracy["top1"])
    else:
        trial = run_trial(build_passes(spec, has_data=has_data), bench, spec.prune.amount if spec.prune else 0.0)

    work_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="compactor-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    with bench.stage(Stage.export):
        # The baseline every figure is compared with: the original, compiled the same way.
        original_ts = to_torchscript(clone(module), example)
        exported: dict[str, Exported] = {}
        for exporter in exporters_for(trial, spec.artifacts):
            result = exporter.export(trial, bench, work_dir)
            if result is not None:
                exported[result.artifact] = result
    deployable_file = exported["model.ts"]

    with bench.stage(Stage.evaluate):
        eval_device = bench.deployable_device(trial)
        if trial.accuracy is None:
            trial.accuracy = bench.evaluate_trial(trial)
        fidelity = measure.fidelity(bench.original_on(ctx.device), trial.deployable.to(eval_device), bench.val_batches(None), ctx.device, eval_device)
        trial.deployable.to("cpu")

    with bench.stage(Stage.benchmark):
        threads = benchmark.threads or torch.get_num_threads()
        runtimes = measure_runtimes(
            bench,
            trial,
            original_ts,
            exported,
            batch_sizes=benchmark.batch_sizes,
            threads=threads,
            warmup=benchmark.warmup,
            runs=benchmark.runs,
            budget_s=benchmark.budget_s,
            quantized_engine=quantized_engine(trial),
            onnx_baseline=benchmark.onnx_baseline,
        )
        cuda_latency = _cuda_benchmark(bench, trial, benchmark, threads)

    plan.report(Stage.benchmark, 1.0)
    measured = Measurements(
        original_accuracy=original_accuracy,
        original_size_bytes=measure.torchscript_size(original_ts),
        compressed_size_bytes=deployable_file.saved.size_bytes,
        runtimes=runtimes,
        cuda_latency=cuda_latency,
        fidelity=fidelity,
        search=search_summary,
        export_check=deployable_file.check,
        artifact_checks={name: result.check for name, result in exported.items() if result.check is not None},
        threads=threads,
        num_classes=num_classes,
        model_format=model_format or "module",
        structure=structure,
        notes=structure_notes,
    )
    metrics = build_report(bench, module, trial, measured)
    artifacts = {name: result.saved.path for name, result in exported.items()}
    report_path = work_dir / REPORT_ARTIFACT
    _write_json_atomically(report_path, metrics)
    artifacts[REPORT_ARTIFACT] = report_path
    return CompressionResult(model=trial.deployable, torchscript=deployable_file.runnable, metrics=metrics, artifacts=artifacts)


def _cuda_benchmark(bench: Workbench, trial: Trial, options: BenchmarkOptions, threads: int) -> dict[str, Any]:
    """Latency of the original and the compressed float model on the GPU, where the job ran there."""
    device = bench.ctx.device
    if device.type != "cuda":
        return {}
    models: dict[str, Any] = {"original": bench.original_on(device)}
    if trial.runs_on is None:  # an INT8 deployable runs where its quantizer said: not here
        models["compressed"] = trial.float_model.to(device).eval()
    try:
        return measure.measure_latency(
            models,
            bench.input_shape,
            batch_sizes=options.batch_sizes,
            device=device,
            threads=threads,
            warmup=options.warmup,
            runs=options.runs,
            budget_s=options.budget_s,
        )
    finally:
        trial.float_model.to("cpu")


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(temporary, path)


def compress_files(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    *,
    dataset_path: Path | None = None,
    progress: Callable[[str, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    benchmark: BenchmarkOptions | None = None,
    limits: Limits | None = None,
    trusted_code: bool = False,
    model_format: str | None = None,
) -> CompressionResult:
    """Load an uploaded model (and dataset) within ``limits`` (the gateway's, from Settings),
    compress it, write the artifacts into ``out_dir``.

    A TorchScript file loads only in a confined process (``worker/confinement.py``) unless
    ``trusted_code``: the caller vouches that it is its own program (a notebook, a test).
    ``model_format``: the format the caller already detected from the file (not sniffed again)."""
    start = time.perf_counter()
    limits = limits or Limits()
    if progress is not None:
        progress("load", 0.0)
    loaded = load_model(
        Path(model_path),
        spec.model,
        LoadLimits(archive=limits.model_archive, max_parameters=limits.max_parameters),
        trusted_code=trusted_code,
        detected_format=model_format,
    )
    if dataset_path is not None:
        dataset_limits = DatasetLimits(archive=limits.dataset_archive, max_input_elements=limits.max_dataset_input_elements)
        dataset = load_dataset(Path(dataset_path), dataset_limits)
        data = split_dataset(dataset, spec.data.val_fraction, spec.data.seed)
    else:
        data = None
    return compress(
        loaded,
        spec,
        data,
        progress=progress,
        should_cancel=should_cancel,
        out_dir=out_dir,
        benchmark=benchmark,
        stage_seconds={"load": time.perf_counter() - start},
    )
