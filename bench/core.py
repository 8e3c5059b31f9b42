"""Benchmark of the compression core against the by-hand baseline (prints a table).

    make bench            # or: python -m bench.core [--epochs 3] [--quick]

Trains torchvision resnet18(num_classes=10) on scikit-learn's digits (8×8
upscaled to 32×32, 3 channels), then compresses it with several specs and, in
the same process, performs the by-hand baseline a practitioner would wire up:
Torch-Pruning magnitude 50% channels, plain fine-tune of the same epochs,
torch.ao FX static INT8 — no BatchNorm recalibration, no distillation — and deploys
it in its fastest runtime (TorchScript INT8, or the pruned float model or ONNX
Runtime's default static INT8 in ONNX Runtime).

Speedups are against the original in its fastest runtime (TorchScript or ONNX
Runtime), as the report's headline; "same runtime" is against the original in the
recommended artifact's own runtime. ``--resnet50`` adds resnet50 at 3×224×224 on
random inputs: both speedups and the benchmark stage's share of the job's time.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from compactor.spec import JobSpec
from tests.support.doors import Door, write_upload
from tests.support.models import train_classifier
from worker.compression import measure
from worker.compression.data import Dataset, split_dataset
from worker.compression.loading import LoadedModel, load_model
from worker.compression.pipeline import BenchmarkOptions, compress

SPECS: dict[str, dict[str, Any]] = {
    "int8 static": {"quantize": {"mode": "static"}},
    "unstructured 50% + ft": {"prune": {"granularity": "unstructured", "amount": 0.5}, "finetune": {}},
    "channel 50% + ft": {"prune": {"granularity": "channel", "amount": 0.5}, "finetune": {}},
    "channel 50% + ft + int8": {"prune": {"granularity": "channel", "amount": 0.5}, "finetune": {}, "quantize": {"mode": "static"}},
    "channel 50% + ft 1 epoch + int8": {
        "prune": {"granularity": "channel", "amount": 0.5},
        "finetune": {"epochs": 1},
        "quantize": {"mode": "static"},
    },
    "channel 50% taylor + ft + int8": {
        "prune": {"granularity": "channel", "amount": 0.5, "criterion": "taylor"},
        "finetune": {},
        "quantize": {"mode": "static"},
    },
    "target drop ≤ 0.5 pt (≤70% ch, ft 6 epochs) + int8": {
        "prune": {"granularity": "channel", "amount": 0.7},
        "finetune": {"epochs": 6},
        "quantize": {"mode": "static"},
        "target": {"max_accuracy_drop": 0.005, "max_trials": 5},
    },
}


# The same spec on the same model uploaded through the graph doors (issue 11: they must reach
# what the state_dict door reaches).
DOOR_ROWS: dict[str, tuple[Door, ...]] = {"channel 50% + ft + int8": ("pt2", "traced")}


def through_door(model: nn.Module, door: Door, directory: Path, example: torch.Tensor) -> LoadedModel:
    """``model`` as a user would upload it through ``door``, loaded as the worker loads it."""
    path = write_upload(copy.deepcopy(model), door, directory, example.expand(2, *example.shape[1:]).clone())
    return load_model(path, JobSpec().model, trusted_code=True)


def digits_rgb32(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits upscaled to 3×32×32, normalized; a fixed 80/20 split into (train, held-out test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.5
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    return images[order[:cut]], targets[order[:cut]], images[order[cut:]], targets[order[cut:]]


def train_resnet18(inputs: torch.Tensor, targets: torch.Tensor, *, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(targets) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    return train_classifier(model, inputs, targets, epochs=epochs, seed=seed, optimizer=optimizer, schedule=schedule)


@torch.inference_mode()
def top1(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(targets), 256):
        correct += int((model(inputs[start : start + 256]).argmax(1) == targets[start : start + 256]).sum())
    return correct / len(targets)


def by_hand_baseline(
    model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *, epochs: int, lr: float, batch_size: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """What a practitioner wires up by hand: Torch-Pruning + plain fine-tune + torch.ao FX INT8."""
    import torch_pruning as tp
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = copy.deepcopy(model).eval()
    example = train_x[:1]
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
        global_pruning=True,
    )
    pruner.step()
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(example,))
        with torch.inference_mode():
            for start in range(0, min(len(train_x), 8 * batch_size), batch_size):
                prepared(train_x[start : start + batch_size])
        quantized = convert_fx(prepared)
    return model, quantized


def ort_default_int8(float_path: Path, path: Path, calibration: torch.Tensor) -> Path:
    """ONNX Runtime's ``quantize_static`` with its defaults (QDQ, S8S8, per-tensor), as its docs show it."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration.split(64))

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._batches, None)
            return None if batch is None else {name: batch.numpy()}

    quantize_static(str(float_path), str(path), Batches())
    return path


def by_hand_deployments(
    original: nn.Module, float_hand: nn.Module, hand_ts: torch.jit.ScriptModule, scratch: Path, calibration: torch.Tensor, threads: int
) -> dict[str, tuple[Any, bool]]:
    """Name → (runnable, is the original): the original and the by-hand model in each runtime a
    practitioner would try. Names start with the runtime."""
    from worker.compression.onnx_runtime import OnnxModel, export_onnx

    example = calibration[:1]
    export_onnx(copy.deepcopy(original).eval(), example, scratch / "original.onnx")
    export_onnx(float_hand, example, scratch / "hand.onnx")
    ort_default_int8(scratch / "hand.onnx", scratch / "hand.int8.onnx", calibration)
    original_ts = torch.jit.freeze(torch.jit.trace(copy.deepcopy(original).eval(), example))
    return {
        "torchscript fp32 original": (original_ts, True),
        "onnxruntime fp32 original": (OnnxModel(scratch / "original.onnx", threads), True),
        "torchscript int8 (FX x86)": (hand_ts, False),
        "onnxruntime fp32 pruned": (OnnxModel(scratch / "hand.onnx", threads), False),
        "onnxruntime int8 (quantize_static defaults)": (OnnxModel(scratch / "hand.int8.onnx", threads), False),
    }


def fastest(latency: dict[str, Any], batch: str, names: list[str]) -> str:
    return min(names, key=lambda name: latency[name][batch]["p50"])


def speedup_over(latency: dict[str, Any], batch: str, baseline: list[str], best: dict[str, str]) -> float:
    """The fastest of ``baseline`` against the chosen deployment at ``batch``."""
    return float(latency[fastest(latency, batch, baseline)][batch]["p50"] / latency[best[batch]][batch]["p50"])


@dataclass
class Row:
    name: str
    val_top1: float | None
    test_top1: float
    size: float
    params: float
    macs: float | None
    speedup_1: float | None
    speedup_32: float | None
    seconds: float
    note: str = ""
    # Against the original in the recommended artifact's runtime, and which artifact that is.
    same_1: float | None = None
    same_32: float | None = None
    deploy: str = ""


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def print_table(rows: list[Row], original: dict[str, Any]) -> str:
    header = (
        "| spec | val top-1 | test top-1 | Δ test (pt) | size | params | MACs | speedup b1 | speedup b32 | "
        "same runtime b1 | same runtime b32 | deploy (b1 / b32) | seconds | note |"
    )
    lines = [header, "|" + "---|" * 14]
    for row in rows:
        lines.append(
            f"| {row.name} | {_fmt(row.val_top1, '{:.2%}')} | {row.test_top1:.2%} | {100 * (row.test_top1 - original['test_top1']):+.2f} | "
            f"{row.size:.3f} | {row.params:.3f} | {_fmt(row.macs, '{:.3f}')} | {_fmt(row.speedup_1, '{:.2f}×')} | "
            f"{_fmt(row.speedup_32, '{:.2f}×')} | {_fmt(row.same_1, '{:.2f}×')} | {_fmt(row.same_32, '{:.2f}×')} | {row.deploy} | "
            f"{row.seconds:.1f} | {row.note} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


def _row(name: str, result: Any, seconds: float, test_x: torch.Tensor, test_y: torch.Tensor) -> Row:
    metrics = result.metrics
    ratios = metrics["ratios"]
    note = ""
    recommended = metrics.get("recommended") or {}
    deploy = " / ".join(f"{choice['artifact']} ({choice['runtime']})" for choice in recommended.values())
    if metrics.get("search"):
        search = metrics["search"]
        note = f"chose {search['chosen_amount']:.0%} ch, budget met: {search['budget_met']}, {len(search['points'])} points"
    row = Row(
        name=name,
        val_top1=(metrics["compressed"]["accuracy"] or {}).get("top1"),
        test_top1=top1(result.model, test_x, test_y),
        size=ratios["size"],
        params=ratios["params"],
        macs=ratios["macs"],
        speedup_1=ratios.get("speedup_batch_1"),
        speedup_32=ratios.get("speedup_batch_32"),
        seconds=seconds,
        note=note,
        same_1=ratios.get("speedup_same_runtime_batch_1"),
        same_32=ratios.get("speedup_same_runtime_batch_32"),
        deploy=deploy,
    )
    print(
        f"{row.name}: test top-1 {row.test_top1:.2%}, size {row.size:.3f}, speedup b32 {_fmt(row.speedup_32, '{:.2f}×')}, {row.seconds:.0f} s",
        flush=True,
    )
    return row


def resnet50_row(*, runs: int) -> None:
    """resnet50 at 3×224×224, 50% channels + 1 epoch on 320 images + INT8, on random inputs
    (latency and time only: its accuracy means nothing): both speedups and where the job's time went."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    inputs = torch.randn(400, 3, 224, 224)
    targets = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(0))
    data = split_dataset(Dataset(inputs=inputs, targets=targets), 0.2, 0)
    spec = JobSpec.model_validate(
        {
            "model": {"input_shape": [1, 3, 224, 224]},
            "prune": {"granularity": "channel", "amount": 0.5},
            "finetune": {"epochs": 1, "lr": 0.01, "optimizer": "sgd"},
            "quantize": {"mode": "static"},
        }
    )
    start = time.perf_counter()
    result = compress(model, spec, data, benchmark=BenchmarkOptions(runs=runs))
    seconds = time.perf_counter() - start
    metrics = result.metrics
    ratios = metrics["ratios"]
    stages = {stage["name"]: stage["seconds"] for stage in metrics["stages"]}
    print(f"resnet50 3×224×224, channel 50% + ft 1 epoch (320 images) + int8: {seconds:.0f} s in compress()")
    print("| batch | recommended | p50 ms | speedup vs original's fastest runtime | vs same runtime |")
    print("|---|---|---|---|---|")
    for key, choice in metrics["recommended"].items():
        print(
            f"| {key.removeprefix('batch_')} | {choice['artifact']} ({choice['runtime']}) | {choice['p50_ms']:.2f} | "
            f"{_fmt(choice['speedup'], '{:.2f}×')} | {_fmt(choice['speedup_same_runtime'], '{:.2f}×')} |"
        )
    print("\n| stage | seconds | share of the job |")
    print("|---|---|---|")
    for name, stage_seconds in stages.items():
        print(f"| {name} | {stage_seconds:.1f} | {stage_seconds / seconds:.0%} |")
    print("\n| model | runtime | b1 p50 ms | b32 p50 ms | runs b1 / b32 |")
    print("|---|---|---|---|---|")
    for row in metrics["runtimes"]:
        b1, b32 = row["latency_ms"]["batch_1"], row["latency_ms"]["batch_32"]
        print(
            f"| {row['artifact'] or 'original'} | {row['runtime']} {row['precision']} | {b1['p50']:.2f} | {b32['p50']:.1f} | "
            f"{b1.get('runs')} / {b32.get('runs')} |"
        )
    print(f"ratios: size {ratios['size']:.3f}, MACs {ratios['macs']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for every spec and for the baseline")
    parser.add_argument("--only", action="append", help="run only specs whose name contains this text")
    parser.add_argument("--runs", type=int, default=30, help="timed latency runs per batch size")
    parser.add_argument("--resnet50", action="store_true", help="only the resnet50 3×224×224 latency row (random inputs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.resnet50:
        resnet50_row(runs=args.runs)
        return

    train_x, train_y, test_x, test_y = digits_rgb32()
    # The original trains on the same training split the pipeline fine-tunes on, so the
    # validation split is unseen by both and the accuracy drop is measured fairly.
    data = split_dataset(Dataset(inputs=train_x, targets=train_y), 0.2, 0)
    started = time.perf_counter()
    model = train_resnet18(data.train.inputs, data.train.targets, epochs=args.train_epochs)
    print(f"trained resnet18 on digits in {time.perf_counter() - started:.1f} s: held-out test top-1 {top1(model, test_x, test_y):.2%}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")

    bench = BenchmarkOptions(runs=args.runs)
    finetune_defaults = {"epochs": args.epochs, "lr": 0.01, "optimizer": "sgd"}

    rows: list[Row] = []
    original: dict[str, Any] = {"test_top1": top1(model, test_x, test_y)}
    for name, raw in SPECS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        raw = copy.deepcopy(raw)
        if "finetune" in raw:
            raw["finetune"] = {**finetune_defaults, **raw["finetune"]}
        spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 32, 32]}, **raw})
        for door in ("module", *DOOR_ROWS.get(name, ())):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="compactor-bench-") as scratch:
                subject = copy.deepcopy(model) if door == "module" else through_door(model, door, Path(scratch), train_x[:1])
                result = compress(subject, spec, data, benchmark=bench)
            rows.append(_row(name if door == "module" else f"{name}, uploaded as {door}", result, time.perf_counter() - start, test_x, test_y))

    example = train_x[:1]
    original_ts = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), example))
    params, _ = measure.count_parameters(model)
    for epochs in sorted({1, args.epochs}):
        start = time.perf_counter()
        float_hand, int8_hand = by_hand_baseline(model, data.train.inputs, data.train.targets, epochs=epochs, lr=0.01, batch_size=64, seed=0)
        seconds = time.perf_counter() - start
        hand_ts = torch.jit.freeze(torch.jit.trace(int8_hand, example))
        with tempfile.TemporaryDirectory(prefix="compactor-bench-hand-") as scratch:
            deployed = by_hand_deployments(model, float_hand, hand_ts, Path(scratch), data.train.inputs[:512], torch.get_num_threads())
            latency = measure.measure_latency(
                {name: runnable for name, (runnable, _) in deployed.items()},
                [1, 3, 32, 32],
                batch_sizes=(1, 32),
                device="cpu",
                threads=torch.get_num_threads(),
                warmup=5,
                runs=args.runs,
                budget_s=bench.budget_s,
            )
            hand_params, _ = measure.count_parameters(float_hand)

            originals = [name for name, (_, is_original) in deployed.items() if is_original]
            hands = [name for name, (_, is_original) in deployed.items() if not is_original]
            best = {batch: fastest(latency, batch, hands) for batch in ("batch_1", "batch_32")}
            chosen = deployed[best["batch_32"]][0]
            same_runtime = {batch: [name for name in originals if name.split()[0] == best[batch].split()[0]] for batch in best}
            rows.append(
                row := Row(
                    name=f"by hand: Torch-Pruning 50% + plain ft {epochs} epoch{'s' if epochs > 1 else ''} + INT8",
                    val_top1=top1(chosen, data.val.inputs, data.val.targets),
                    test_top1=top1(chosen, test_x, test_y),
                    size=measure.torchscript_size(hand_ts) / measure.torchscript_size(original_ts),
                    params=hand_params / params,
                    macs=measure.count_macs(float_hand, example) / measure.count_macs(model, example),
                    speedup_1=speedup_over(latency, "batch_1", originals, best),
                    speedup_32=speedup_over(latency, "batch_32", originals, best),
                    same_1=speedup_over(latency, "batch_1", same_runtime["batch_1"], best),
                    same_32=speedup_over(latency, "batch_32", same_runtime["batch_32"], best),
                    deploy=f"{best['batch_1']} / {best['batch_32']}",
                    seconds=seconds,
                    note="no BN recalibration, no distillation; accuracy of the batch-32 choice",
                )
            )
        print(f"{row.name}: test top-1 {row.test_top1:.2%}, size {row.size:.3f}, deploy {row.deploy}", flush=True)
    original["val_top1"] = top1(model, data.val.inputs, data.val.targets)
    print(
        f"\noriginal: validation top-1 {original['val_top1']:.2%}, held-out test top-1 {original['test_top1']:.2%}; ratios are compressed / original, speedups original / compressed (CPU p50)\n"
    )
    print_table(rows, original)


if __name__ == "__main__":
    main()
