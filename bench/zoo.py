"""The zoo table: one model of every torchvision classification family (plus the custom
architectures of tests/support/architectures.py and two timm families) through each upload door,
channel 30% + static INT8 on random inputs. Prints a markdown table (and writes it to
bench/results/zoo.md).

    make bench-zoo        # or: python -m bench.zoo [--only resnet] [--doors pt2,torchscript] [--runs 5]

Doors: ``state_dict`` (weights + ``model.arch``), ``pt2`` (``torch.export.save``) and
``torchscript`` (``torch.jit.trace``; converted to a graph in the job as the service does).
Every cell is what a job would end with: the ratios, or the error code and its first words.
Speedups are CPU p50 at batch 1 and 32 on this machine, as the report's headline: the recommended
artifact in its runtime against the original in its fastest runtime (TorchScript or ONNX Runtime);
"TS/TS" is model.ts against the original, both TorchScript; "deploy" names the recommended
artifacts at batch 1 / batch 32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactor.errors import CompactorError
from compactor.spec import JobSpec
from tests.support.architectures import CUSTOM_ARCHITECTURES, build_custom
from tests.support.doors import write_upload
from worker.compression.loading import build_architecture, load_model
from worker.compression.pipeline import BenchmarkOptions, compress

# (name, model.arch, arch_kwargs, input side): one member per family, at the smallest input the
# family accepts, so the whole table runs in tens of minutes on two cores.
TORCHVISION: list[tuple[str, dict[str, Any], int]] = [
    ("resnet18", {}, 64),
    ("resnext50_32x4d", {}, 64),
    ("wide_resnet50_2", {}, 64),
    ("vgg11_bn", {}, 64),
    ("alexnet", {}, 64),
    ("squeezenet1_0", {}, 64),
    ("densenet121", {}, 64),
    ("googlenet", {"aux_logits": False, "init_weights": False}, 64),
    ("inception_v3", {"aux_logits": False, "init_weights": False}, 96),
    ("mobilenet_v2", {}, 64),
    ("mobilenet_v3_small", {}, 64),
    ("mnasnet0_5", {}, 64),
    ("shufflenet_v2_x0_5", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("efficientnet_v2_s", {}, 64),
    ("regnet_x_400mf", {}, 64),
    ("regnet_y_400mf", {}, 64),
    ("convnext_tiny", {}, 64),
    ("swin_t", {}, 64),
    ("vit_b_16", {"image_size": 64}, 64),
    ("maxvit_t", {}, 224),
]
TIMM: list[tuple[str, dict[str, Any], int]] = [("timm/resnet18d", {}, 64), ("timm/efficientnet_b0", {}, 64)]
DOORS = ("state_dict", "pt2", "torchscript")
SPEC: dict[str, Any] = {"prune": {"granularity": "channel", "amount": 0.3}, "quantize": {"mode": "static"}}


@dataclass
class Cell:
    model: str
    door: str
    outcome: str
    macs: float | None = None
    params: float | None = None
    size: float | None = None
    speedup_1: float | None = None
    speedup_32: float | None = None
    seconds: float = 0.0
    ts_1: float | None = None
    ts_32: float | None = None
    deploy: str = ""


def run_cell(name: str, build: Callable[[], nn.Module], arch: str | None, arch_kwargs: dict[str, Any], side: int, door: str, runs: int) -> Cell:
    shape = [1, 3, side, side] if side else [1, 1, 8, 8]
    spec = JobSpec.model_validate({"model": {"input_shape": shape, "arch": arch, "arch_kwargs": arch_kwargs}, **SPEC})
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="compactor-zoo-") as scratch:
            directory = Path(scratch)
            try:
                example = torch.randn(2, 3, side, side) if side else torch.randn(2, 1, 8, 8)
                path = write_upload(build(), "traced" if door == "torchscript" else door, directory, example)
            except Exception as error:  # noqa: BLE001 - the user could not even make this upload
                return Cell(name, door, f"not exportable by the user: {type(error).__name__}", seconds=time.perf_counter() - started)
            loaded = load_model(path, spec.model, trusted_code=True)
            result = compress(loaded, spec, out_dir=directory / "out", benchmark=BenchmarkOptions(warmup=2, runs=runs))
    except CompactorError as error:
        return Cell(name, door, f"{error.code}: {str(error)[:90]}", seconds=time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - a crash is a bug to fix, recorded as the service would
        return Cell(name, door, f"internal_error: {type(error).__name__}: {str(error)[:80]}", seconds=time.perf_counter() - started)
    metrics = result.metrics
    ratios = metrics["ratios"]
    original_ts, compressed_ts = metrics["original"]["latency_ms"]["cpu"], metrics["compressed"]["latency_ms"]["cpu"]
    return Cell(
        name,
        door,
        "succeeded",
        macs=ratios["macs"],
        params=ratios["params"],
        size=ratios["size"],
        speedup_1=ratios.get("speedup_batch_1"),
        speedup_32=ratios.get("speedup_batch_32"),
        seconds=time.perf_counter() - started,
        ts_1=original_ts["batch_1"]["p50"] / compressed_ts["batch_1"]["p50"],
        ts_32=original_ts["batch_32"]["p50"] / compressed_ts["batch_32"]["p50"],
        deploy=" / ".join(choice["artifact"] for choice in metrics["recommended"].values()),
    )


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def table(cells: list[Cell]) -> str:
    lines = [
        "| model | door | outcome | MACs | params | size | speedup b1 | speedup b32 | TS/TS b1 | TS/TS b32 | deploy (b1 / b32) | seconds |",
        "|" + "---|" * 12,
    ]
    for cell in cells:
        lines.append(
            f"| {cell.model} | {cell.door} | {cell.outcome.replace('|', '/')} | {_fmt(cell.macs, '{:.3f}')} | {_fmt(cell.params, '{:.3f}')} | "
            f"{_fmt(cell.size, '{:.3f}')} | {_fmt(cell.speedup_1, '{:.2f}×')} | {_fmt(cell.speedup_32, '{:.2f}×')} | "
            f"{_fmt(cell.ts_1, '{:.2f}×')} | {_fmt(cell.ts_32, '{:.2f}×')} | {cell.deploy} | {cell.seconds:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="run only models whose name contains this text")
    parser.add_argument("--doors", default=",".join(DOORS), help="comma-separated doors")
    parser.add_argument("--runs", type=int, default=5, help="timed latency runs per batch size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo.md")
    args = parser.parse_args()
    doors = [door for door in args.doors.split(",") if door]
    cases: list[tuple[str, Callable[[], nn.Module], str | None, dict[str, Any], int, list[str]]] = []
    for arch, kwargs, side in [*TORCHVISION, *TIMM]:
        full = {"num_classes": 10, **kwargs}

        def build(arch: str = arch, full: dict[str, Any] = full) -> nn.Module:
            torch.manual_seed(0)
            return build_architecture(arch, full).eval()

        cases.append((arch, build, arch, full, side, doors))
    for name in CUSTOM_ARCHITECTURES:
        # No builder knows them: the graph doors only.
        cases.append((f"custom/{name}", lambda name=name: build_custom(name), None, {}, 0, [door for door in doors if door != "state_dict"]))
    cells: list[Cell] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; spec {SPEC}", flush=True)
    for name, build, arch, kwargs, side, case_doors in cases:
        if args.only and not any(part in name for part in args.only):
            continue
        for door in case_doors:
            cell = run_cell(name, build, arch, kwargs, side, door, args.runs)
            cells.append(cell)
            print(f"{name} via {door}: {cell.outcome}, MACs {_fmt(cell.macs, '{:.3f}')}, {cell.seconds:.0f} s", flush=True)
    rendered = table(cells)
    print("\n" + rendered)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(rendered + "\n")


if __name__ == "__main__":
    main()
