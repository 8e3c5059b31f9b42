"""The compression pipeline: score → prune → fine-tune → quantize → evaluate → benchmark → export.

``compress`` works on in-memory models and data (usable from a notebook);
``compress_files`` loads an uploaded model and dataset first and writes the
artifacts (``model.ts``, ``report.json``, ``model.pt``) into a directory.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactor.compat import DatasetFacts, check_compatibility
from compactor.errors import CompressionFailed, InvalidModel, InvalidSpec
from compactor.limits import Limits
from compactor.spec import JobSpec, PruneSpec
from worker.compression import measure
from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria import get_criterion
from worker.compression.data import DatasetLimits, SplitData, load_dataset, split_dataset, synthetic_data
from worker.compression.export import save_state_dict, save_torchscript, to_torchscript, verify_reload
from worker.compression.finetune import finetune
from worker.compression.loading import LoadedModel, LoadLimits, load_model
from worker.compression.progress import STAGE_WEIGHTS, ProgressPlan
from worker.compression.pruning import (
    apply_masks,
    prunable_layers,
    prune_channels,
    prune_unstructured,
    recalibrate_batchnorm,
    scoring_parameters,
)
from worker.compression.quantization import quantize

SYNTHETIC_SAMPLES = 256


@dataclass
class BenchmarkOptions:
    warmup: int = 5
    runs: int = 30
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int | None = None  # None: the process's current torch thread count


@dataclass
class Trial:
    """One prune amount tried: the float model after fine-tuning, and its deployable form."""

    amount: float
    float_model: nn.Module
    deployable: nn.Module
    accuracy: dict[str, float] | None
    masks: dict[str, torch.Tensor] | None = None
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    float_layers: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    finetune: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CompressionResult:
    model: nn.Module
    torchscript: torch.jit.ScriptModule
    metrics: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)


class _StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def as_list(self) -> list[dict[str, Any]]:
        return [{"name": name, "seconds": round(seconds, 4)} for name, seconds in self.seconds.items()]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSpec("device 'cuda' was requested but this worker has no GPU; use 'auto' or 'cpu'", field="device")
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _clone(model: nn.Module) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        # A deep copy of a ScriptModule has non-leaf parameters (fine-tuning cannot optimise them),
        # so it is serialized and reloaded: no new code, the same program this process already
        # loaded — inside the confined child when it is an upload's (loading.load_model).
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)


def is_memory_exhaustion(error: BaseException) -> bool:
    """An allocation failed (Python's MemoryError, or torch's allocator, also through TorchScript)."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text


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


def _trial_segments(spec: JobSpec, has_data: bool) -> list[tuple[str, float]]:
    per_trial: list[tuple[str, float]] = []
    if spec.prune is not None:
        epochs = spec.finetune.epochs if spec.finetune is not None and has_data else 0
        per_trial += [("score", STAGE_WEIGHTS["score"]), ("prune", STAGE_WEIGHTS["prune"])] * spec.prune.steps
        per_trial += [("finetune", STAGE_WEIGHTS["finetune"] * epochs)] if epochs else []
    elif spec.finetune is not None and has_data:
        per_trial += [("finetune", STAGE_WEIGHTS["finetune"] * spec.finetune.epochs)]
    if spec.quantize is not None:
        per_trial.append(("quantize", STAGE_WEIGHTS["quantize"]))
    if spec.target is not None:
        per_trial.append(("evaluate", STAGE_WEIGHTS["evaluate"] / 2))
    return per_trial


def _progress_plan(spec: JobSpec, has_data: bool) -> list[tuple[str, float]]:
    trials = spec.target.max_trials if spec.target is not None else 1
    plan = [("evaluate", STAGE_WEIGHTS["evaluate"])] + _trial_segments(spec, has_data) * trials
    plan += [("export", STAGE_WEIGHTS["export"]), ("evaluate", STAGE_WEIGHTS["evaluate"]), ("benchmark", STAGE_WEIGHTS["benchmark"])]
    return plan


class _Pipeline:
    def __init__(
        self,
        model: nn.Module,
        spec: JobSpec,
        data: SplitData,
        *,
        scripted: bool,
        ctx: RunContext,
        plan: ProgressPlan,
        clock: _StageClock,
        benchmark: BenchmarkOptions,
    ) -> None:
        self.spec = spec
        self.data = data
        self.scripted = scripted
        self.ctx = ctx
        self.plan = plan
        self.clock = clock
        self.benchmark = benchmark
        # The caller's model stays untouched on the CPU; GPU work uses a copy.
        self.original = model.eval()
        self._original_on_device: nn.Module | None = None
        self.batch_size = spec.data.batch_size
        self.example = data.val.inputs[:1].clone() if len(data.val.inputs) else data.train.inputs[:1].clone()
        self.input_shape = [1, *self.example.shape[1:]]
        self._epoch = 0

    def original_on(self, device: torch.device) -> nn.Module:
        if device.type == "cpu":
            return self.original
        if self._original_on_device is None:
            self._original_on_device = _clone(self.original).to(device).eval()
        return self._original_on_device

    # -- data feeds ---------------------------------------------------------------------------
    def train_batches(self, device: torch.device | None = None) -> BatchSource:
        # A new shuffle seed per pass keeps epochs different yet the whole run reproducible.
        def source():
            self._epoch += 1
            return self.data.batches("train", self.batch_size, shuffle=True, seed=self.spec.data.seed + self._epoch, device=device)()

        return source

    def val_batches(self, device: torch.device | None = None) -> BatchSource:
        return self.data.batches("val", self.batch_size, device=device)

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train.inputs) / self.batch_size)

    # -- stages -------------------------------------------------------------------------------
    def _stage(self, name: str, weight: float):
        # Stages without batches (export, benchmark) still stop promptly at their boundary.
        self.ctx.check_cancelled()
        self.plan.begin(name, weight)
        return self.clock(name)

    def run_trial(self, prune: PruneSpec | None) -> Trial:
        ctx = self.ctx
        device = ctx.device
        # Every trial sees the same data order, so two prune amounts differ only by the amount.
        self._epoch = 0
        model = _clone(self.original).to(device)
        teacher = None
        finetune_spec = self.spec.finetune if not self.data.synthetic else None
        if finetune_spec is not None and (finetune_spec.distill is not None or not self.data.has_targets):
            teacher = self.original_on(device)
        trial = Trial(amount=prune.amount if prune else 0.0, float_model=model, deployable=model, accuracy=None)
        epochs_total = finetune_spec.epochs if finetune_spec is not None else 0

        if prune is not None and prune.amount > 0:
            steps = prune.steps
            epoch_split = [epochs_total // steps + (1 if i < epochs_total % steps else 0) for i in range(steps)]
            criterion = get_criterion(prune.criterion)
            channel_mode = prune.granularity == "channel"
            masks: dict[str, torch.Tensor] | None = None
            for step in range(steps):
                layers = prunable_layers(model, prune.exclude, channel_mode=channel_mode, example_inputs=self.example.to(device))
                if not layers:
                    raise InvalidSpec("no prunable Conv/Linear layer is left after 'exclude'", field="prune.exclude")
                with self._stage("score", STAGE_WEIGHTS["score"]):
                    parameters = scoring_parameters(model, layers, channel_mode=channel_mode)
                    scores = criterion.score(model, parameters, self.train_batches(device) if not self.data.synthetic else None, ctx, prune.score_batches)
                with self._stage("prune", STAGE_WEIGHTS["prune"]):
                    if channel_mode:
                        # Each step removes the same share of what is left, reaching `amount` after the last.
                        step_amount = 1.0 - (1.0 - prune.amount) ** (1.0 / steps)
                        report = prune_channels(model, self.example.to(device), scores, step_amount, prune.scope, prune.exclude, ctx)
                        for name, counts in report.channels.items():
                            first = trial.channels.setdefault(name, dict(counts))
                            first["after"] = counts["after"]
                        if not self.data.synthetic:
                            recalibrate_batchnorm(model, self.train_batches(device), ctx)
                        else:
                            ctx.warn("BatchNorm statistics were not re-estimated after channel pruning: no dataset was given")
                    else:
                        cumulative = prune.amount * (step + 1) / steps
                        masks = prune_unstructured(model, scores, cumulative, prune.scope, layers, previous_masks=masks)
                        trial.masks = masks
                if epoch_split[step] > 0 and finetune_spec is not None:
                    with self._stage("finetune", STAGE_WEIGHTS["finetune"] * epoch_split[step]):
                        current_masks = masks
                        summary = finetune(
                            model,
                            finetune_spec,
                            train=self.train_batches(device),
                            batches_per_epoch=self.batches_per_epoch(),
                            ctx=ctx,
                            teacher=teacher,
                            after_step=(lambda: apply_masks(model, current_masks)) if current_masks else None,
                            epochs=epoch_split[step],
                        )
                        trial.finetune.append(summary.__dict__)
                        self._refresh_batchnorm(model, device)
        elif finetune_spec is not None and epochs_total > 0:
            with self._stage("finetune", STAGE_WEIGHTS["finetune"] * epochs_total):
                summary = finetune(
                    model, finetune_spec, train=self.train_batches(device), batches_per_epoch=self.batches_per_epoch(), ctx=ctx, teacher=teacher
                )
                trial.finetune.append(summary.__dict__)
                self._refresh_batchnorm(model, device)

        model = model.to("cpu").eval()
        trial.float_model = model
        trial.deployable = model
        if self.spec.quantize is not None:
            with self._stage("quantize", STAGE_WEIGHTS["quantize"]):
                # INT8 kernels are CPU kernels: calibrate (and later benchmark) INT8 on the CPU.
                result = quantize(
                    _clone(model),
                    self.spec.quantize,
                    example_inputs=self.example,
                    calibration=self.train_batches(torch.device("cpu")),
                    ctx=ctx,
                )
                trial.deployable = result.model
                trial.float_layers = result.float_layers
                trial.quantization = {
                    "mode": result.mode,
                    "backend": result.backend,
                    "calibration_batches": result.calibration_batches_used,
                    "float_layers": result.float_layers,
                }
        return trial

    def _refresh_batchnorm(self, model: nn.Module, device: torch.device) -> None:
        """Re-estimate BatchNorm statistics on the weights fine-tuning left.

        A short fine-tune moves the weights far more than the running statistics follow
        (momentum 0.1 over a few dozen steps): the training loss falls while evaluation,
        which uses the stale statistics, can stay near chance (seen: 0.84 → 0.20 top-1 on a
        50%-channel resnet18 after 12 steps). One pass over training batches fixes it."""
        if not self.data.synthetic:
            recalibrate_batchnorm(model, self.train_batches(device), self.ctx)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float] | None:
        if not self.data.has_targets:
            return None
        return measure.evaluate_accuracy(model, self.val_batches(device), device)

    def deployable_device(self, trial: Trial) -> torch.device:
        # INT8 kernels (static and dynamic) exist only for the CPU.
        return torch.device("cpu") if trial.quantization is not None else self.ctx.device

    def evaluate_trial(self, trial: Trial) -> dict[str, float] | None:
        device = self.deployable_device(trial)
        try:
            return self.evaluate(trial.deployable.to(device), device)
        finally:
            # Export and INT8 work happen on the CPU; a trial must not stay on the GPU.
            trial.deployable.to("cpu")


def _search(pipeline: _Pipeline, original_top1: float, log: list[dict[str, Any]]) -> tuple[Trial, dict[str, Any]]:
    """Largest prune amount ≤ prune.amount whose validation top-1 stays within the budget (bisection)."""
    spec = pipeline.spec
    assert spec.prune is not None and spec.target is not None
    budget = spec.target.max_accuracy_drop
    trial_weight = sum(weight for _, weight in _trial_segments(spec, not pipeline.data.synthetic))
    low, high = 0.0, spec.prune.amount
    best_ok: Trial | None = None
    best_any: Trial | None = None
    amount = high
    tried: set[float] = set()
    for index in range(spec.target.max_trials):
        amount = round(amount, 4)
        if amount in tried or amount <= 0:
            pipeline.plan.skip(trial_weight * (spec.target.max_trials - index))
            break
        tried.add(amount)
        trial = pipeline.run_trial(spec.prune.model_copy(update={"amount": amount}))
        with pipeline._stage("evaluate", STAGE_WEIGHTS["evaluate"] / 2):
            trial.accuracy = pipeline.evaluate_trial(trial)
        top1 = trial.accuracy["top1"] if trial.accuracy else 0.0
        drop = original_top1 - top1
        within = drop <= budget + 1e-9
        log.append({"amount": amount, "top1": top1, "accuracy_drop": round(drop, 6), "within_budget": within})
        if best_any is None or (best_any.accuracy or {}).get("top1", 0.0) < top1:
            best_any = trial
        if within:
            best_ok = trial if best_ok is None or trial.amount > best_ok.amount else best_ok
            low = amount
        else:
            high = amount
        if within and amount == spec.prune.amount:
            pipeline.plan.skip(trial_weight * (spec.target.max_trials - index - 1))
            break
        amount = (low + high) / 2
        # Once the interval is narrower than a percent of sparsity, more trials buy nothing.
        if high - low < 0.01:
            pipeline.plan.skip(trial_weight * (spec.target.max_trials - index - 1))
            break
    chosen = best_ok or best_any
    assert chosen is not None
    chosen_drop = original_top1 - ((chosen.accuracy or {}).get("top1", 0.0))
    summary = {
        "max_accuracy_drop": budget,
        "budget_met": best_ok is not None,
        "chosen_amount": chosen.amount,
        "accuracy_drop": round(chosen_drop, 6),
        "missed_by": None if best_ok is not None else round(chosen_drop - budget, 6),
        "points": log,
    }
    return chosen, summary


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
    benchmark = benchmark or BenchmarkOptions()
    clock = _StageClock()
    if stage_seconds:
        clock.seconds.update(stage_seconds)
    plan = ProgressPlan(_progress_plan(spec, not data.synthetic), progress)
    ctx = RunContext(device=resolve_device(spec.device), progress=plan.report, should_cancel=should_cancel or (lambda: False))
    # The gateway's own check, on what is known here: one set of rules for the service and notebooks.
    dataset_facts = None if data.synthetic else DatasetFacts(
        format="tensors", num_samples=len(data.train.inputs) + len(data.val.inputs), has_targets=data.has_targets
    )
    model_format = loaded.format if loaded is not None else ("torchscript" if scripted else None)
    check_compatibility(model_format, spec, dataset_facts, architecture_built=True)

    pipeline = _Pipeline(module, spec, data, scripted=scripted, ctx=ctx, plan=plan, clock=clock, benchmark=benchmark)
    example = pipeline.example
    num_classes = _output_check(module, example)
    if data.has_targets and data.num_classes_seen > num_classes:
        raise InvalidSpec(
            f"the dataset has targets up to {data.num_classes_seen - 1} but the model outputs {num_classes} classes",
            field="model.arch_kwargs",
        )

    with pipeline._stage("evaluate", STAGE_WEIGHTS["evaluate"]):
        original_accuracy = pipeline.evaluate(pipeline.original_on(ctx.device), ctx.device)

    search_summary: dict[str, Any] | None = None
    if spec.target is not None:
        assert original_accuracy is not None
        trial, search_summary = _search(pipeline, original_accuracy["top1"], [])
    else:
        trial = pipeline.run_trial(spec.prune)

    with pipeline._stage("export", STAGE_WEIGHTS["export"]):
        original_ts = to_torchscript(_clone(module), example)
        # INT8 weights are repacked for whichever engine is active when frozen or loaded.
        engine = spec.quantize.backend if trial.quantization is not None and spec.quantize is not None else None
        compressed_ts = to_torchscript(trial.deployable, example, quantized_engine=engine)
        work_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="compactor-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        artifacts: dict[str, Path] = {}
        model_ts = work_dir / "model.ts"
        save_torchscript(compressed_ts, model_ts)
        artifacts["model.ts"] = model_ts
        reload_check = verify_reload(model_ts, trial.deployable, example, quantized_engine=engine)
        if not reload_check.get("ok", False):
            raise CompressionFailed(f"the exported model.ts does not reproduce the compressed model's outputs: {reload_check}")
        architecture_changed = spec.prune is not None and spec.prune.granularity == "channel" and trial.amount > 0
        if not architecture_changed:
            state_path = work_dir / "model.pt"
            save_state_dict(trial.float_model, state_path)
            artifacts["model.pt"] = state_path

    with pipeline._stage("evaluate", STAGE_WEIGHTS["evaluate"]):
        eval_device = pipeline.deployable_device(trial)
        if trial.accuracy is None:
            trial.accuracy = pipeline.evaluate_trial(trial)
        fidelity = measure.fidelity(
            pipeline.original_on(ctx.device), trial.deployable.to(eval_device), pipeline.val_batches(None), ctx.device, eval_device
        )
        trial.deployable.to("cpu")

    with pipeline._stage("benchmark", STAGE_WEIGHTS["benchmark"]):
        threads = benchmark.threads or torch.get_num_threads()
        latency = measure.measure_latency(
            {"original": original_ts, "compressed": compressed_ts},
            pipeline.input_shape,
            batch_sizes=benchmark.batch_sizes,
            device="cpu",
            threads=threads,
            warmup=benchmark.warmup,
            runs=benchmark.runs,
            quantized_engine=engine,
        )
        cuda_latency: dict[str, Any] = {}
        if ctx.device.type == "cuda":
            cuda_models: dict[str, Any] = {"original": pipeline.original_on(ctx.device)}
            if trial.quantization is None:
                cuda_models["compressed"] = trial.float_model.to(ctx.device).eval()
            cuda_latency = measure.measure_latency(
                cuda_models, pipeline.input_shape, batch_sizes=benchmark.batch_sizes, device="cuda",
                threads=threads, warmup=benchmark.warmup, runs=benchmark.runs,
            )
            trial.float_model.to("cpu")

    plan.report("benchmark", 1.0)
    metrics = _report(
        pipeline=pipeline,
        module=module,
        trial=trial,
        original_ts=original_ts,
        compressed_ts=compressed_ts,
        original_accuracy=original_accuracy,
        latency=latency,
        cuda_latency=cuda_latency,
        fidelity=fidelity,
        search_summary=search_summary,
        reload_check=reload_check,
        threads=threads,
        num_classes=num_classes,
        loaded=loaded,
    )
    report_path = work_dir / "report.json"
    _write_json_atomically(report_path, metrics)
    artifacts["report.json"] = report_path
    return CompressionResult(model=trial.deployable, torchscript=compressed_ts, metrics=metrics, artifacts=artifacts)


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(temporary, path)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 6)


def _report(
    *,
    pipeline: _Pipeline,
    module: nn.Module,
    trial: Trial,
    original_ts: torch.jit.ScriptModule,
    compressed_ts: torch.jit.ScriptModule,
    original_accuracy: dict[str, float] | None,
    latency: dict[str, Any],
    cuda_latency: dict[str, Any],
    fidelity: dict[str, float],
    search_summary: dict[str, Any] | None,
    reload_check: dict[str, Any],
    threads: int,
    num_classes: int,
    loaded: LoadedModel | None,
) -> dict[str, Any]:
    spec = pipeline.spec
    example = pipeline.example
    ctx = pipeline.ctx
    params, nonzero = measure.count_parameters(module)
    c_params, c_nonzero = measure.count_parameters(trial.float_model)
    macs_original = measure.count_macs(module, example)
    macs_compressed = measure.count_macs(trial.float_model, example)
    size_original = measure.torchscript_size(original_ts)
    size_compressed = measure.torchscript_size(compressed_ts)

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

    notes: list[str] = []
    if spec.prune is not None and spec.prune.granularity == "unstructured":
        notes.append(
            "Unstructured pruning zeroes weights but keeps dense tensors: the file size, MACs and dense-kernel "
            "latency do not shrink from it; nonzero_params shows the sparsity, which pays off only with sparse "
            "storage or sparse kernels."
        )
    if original_accuracy is None:
        notes.append(
            "No accuracy: "
            + ("no dataset was uploaded, so calibration and benchmarks used random inputs." if pipeline.data.synthetic else "the dataset has no targets.")
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
        "fidelity": fidelity,
        "layers": layers,
        "stages": pipeline.clock.as_list(),
        "search": search_summary,
        "prune": None if spec.prune is None else {"amount": trial.amount, "granularity": spec.prune.granularity, "criterion": spec.prune.criterion},
        "finetune": trial.finetune,
        "quantization": trial.quantization,
        "export_check": reload_check,
        "environment": {
            "torch": torch.__version__,
            "device": str(ctx.device),
            "cuda_device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else None,
            "quantization_backend": trial.quantization["backend"] if trial.quantization else None,
            "cpu_threads": threads,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "input_shape": pipeline.input_shape,
            "num_classes": num_classes,
            "model_format": loaded.format if loaded is not None else ("torchscript" if pipeline.scripted else "module"),
            "dataset": {
                "synthetic": pipeline.data.synthetic,
                "train_samples": len(pipeline.data.train.inputs),
                "val_samples": len(pipeline.data.val.inputs),
            },
        },
        "warnings": warnings,
        "notes": notes,
    }
    return report


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
) -> CompressionResult:
    """Load an uploaded model (and dataset) within ``limits`` (the gateway's, from Settings),
    compress it, write the artifacts into ``out_dir``.

    A TorchScript file loads only in a confined process (``worker/confinement.py``) unless
    ``trusted_code``: the caller vouches that it is its own program (a notebook, a test)."""
    start = time.perf_counter()
    limits = limits or Limits()
    if progress is not None:
        progress("load", 0.0)
    loaded = load_model(
        Path(model_path), spec.model, LoadLimits(archive=limits.model_archive, max_parameters=limits.max_parameters), trusted_code=trusted_code
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
