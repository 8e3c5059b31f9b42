"""PT2E + Inductor beside the torch.ao FX path we ship: is torch.ao's successor worth switching to yet?

    make bench-pt2e        # installs the bench extra (torchao), then: python -m bench.pt2e

torch 2.14 marks ``torch.ao.quantization`` deprecated; its successor is PT2E quantization
(torchao's ``X86InductorQuantizer``) compiled by Inductor. ``worker/compression/quantization/
ao_backend.py`` keeps the FX path until this table says otherwise. Same digits resnet18 as
``bench.core`` (trained here), original and Torch-Pruning 50% channels, each as:

- FP32 TorchScript (frozen) and FP32 ONNX Runtime: the baselines of the runtime table;
- FX x86 INT8 TorchScript: what ``model.ts`` ships;
- Inductor FP32: ``torch.compile`` of the ``torch.export`` program;
- PT2E INT8 + Inductor: ``prepare_pt2e`` / ``convert_pt2e`` with ``X86InductorQuantizer``, then
  ``torch.compile`` (``freezing`` on, as torchao's docs ask for the INT8 kernels).

A row that fails says where and with what error instead of a time. Latency p50 at batch 1 and 32,
interleaved in one process (``measure.measure_latency``); test top-1 on the held-out split.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core import by_hand_baseline, digits_rgb32, top1, train_resnet18
from worker.compression import measure
from worker.compression.data import Dataset, split_dataset
from worker.compression.onnx_runtime import OnnxModel, export_onnx

Runnable = Callable[[torch.Tensor], Any]


def _error(stage: str, error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{stage}: {type(error).__name__}: {text[:160]}"


def fx_int8(model: nn.Module, calibration: torch.Tensor) -> Runnable:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), example_inputs=(calibration[:1],))
    with torch.inference_mode():
        for batch in calibration.split(64):
            prepared(batch)
    return torch.jit.freeze(torch.jit.trace(convert_fx(prepared), calibration[:1]))


def _exported(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(copy.deepcopy(model).eval(), (example.expand(2, *example.shape[1:]).clone(),), dynamic_shapes=({0: batch},))
    return program.module()


def _compiled(module: torch.fx.GraphModule, shapes: tuple[torch.Tensor, ...]) -> Runnable:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(module, dynamic=False)
    with torch.inference_mode():
        for inputs in shapes:  # compile every timed shape now, not inside the timing
            compiled(inputs)

    def run(inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return compiled(inputs)

    return run


def inductor_fp32(model: nn.Module, example: torch.Tensor, shapes: tuple[torch.Tensor, ...]) -> Runnable:
    return _compiled(_exported(model, example), shapes)


def pt2e_int8(model: nn.Module, calibration: torch.Tensor, shapes: tuple[torch.Tensor, ...]) -> Runnable:
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(_exported(model, calibration[:1]), quantizer)
    with torch.inference_mode():
        for batch in calibration.split(64):
            prepared(batch)
    converted = convert_pt2e(prepared)
    pt2e.move_exported_model_to_eval(converted)
    return _compiled(converted, shapes)


def variants(model: nn.Module, calibration: torch.Tensor, scratch: Path, threads: int, name: str) -> dict[str, Runnable | str]:
    """Name → runnable, or the error that stopped it."""
    example = calibration[:1]
    shapes = (torch.randn(1, *example.shape[1:]), torch.randn(32, *example.shape[1:]))
    builders: dict[str, Callable[[], Runnable]] = {
        "TorchScript FP32": lambda: torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), example)),
        "ONNX Runtime FP32": lambda: OnnxModel(export_onnx(copy.deepcopy(model).eval(), example, scratch / f"{name}.onnx").path, threads),
        "FX x86 INT8 TorchScript": lambda: fx_int8(model, calibration),
        "Inductor FP32": lambda: inductor_fp32(model, example, shapes),
        "PT2E X86InductorQuantizer INT8 + Inductor": lambda: pt2e_int8(model, calibration, shapes),
    }
    built: dict[str, Runnable | str] = {}
    for label, build in builders.items():
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[label] = build()
        except Exception as error:  # noqa: BLE001 - a failing row is the finding, not a crash
            built[label] = _error("build", error)
        print(f"{name} / {label}: {time.perf_counter() - started:.1f} s{'' if callable(built[label]) else ' — ' + str(built[label])}", flush=True)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-epochs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("bench/results/pt2e.md"))
    args = parser.parse_args()
    try:
        import torchao
    except ImportError:
        raise SystemExit("torchao is not installed: run `make bench-pt2e` (it installs the bench extra)") from None

    threads = torch.get_num_threads()
    train_x, train_y, test_x, test_y = digits_rgb32()
    data = split_dataset(Dataset(inputs=train_x, targets=train_y), 0.2, 0)
    model = train_resnet18(data.train.inputs, data.train.targets, epochs=args.train_epochs).eval()
    pruned, _ = by_hand_baseline(model, data.train.inputs, data.train.targets, epochs=1, lr=0.01, batch_size=64, seed=0)
    calibration = data.train.inputs[:512]

    lines = [
        f"torch {torch.__version__}, torchao {torchao.__version__}, {threads} threads; digits resnet18 3×32×32; p50 ms",
        "",
        "| model | form | b1 p50 | b32 p50 | test top-1 | note |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="compactor-pt2e-") as scratch:
        for name, subject in (("original", model), ("50% channels", pruned)):
            built = variants(subject, calibration, Path(scratch), threads, name)
            runnable = {label: value for label, value in built.items() if callable(value)}
            latency: dict[str, Any] = {}
            if runnable:
                latency = measure.measure_latency(
                    runnable, [1, 3, 32, 32], batch_sizes=(1, 32), device="cpu", threads=threads, warmup=5, runs=args.runs, budget_s=3.0
                )
            for label, value in built.items():
                if not callable(value):
                    lines.append(f"| {name} | {label} | — | — | — | {value} |")
                    continue
                try:
                    accuracy = f"{top1(value, test_x, test_y):.2%}"  # type: ignore[arg-type]
                except Exception as error:  # noqa: BLE001
                    accuracy = _error("run", error)
                row = latency[label]
                lines.append(f"| {name} | {label} | {row['batch_1']['p50']:.3f} | {row['batch_32']['p50']:.2f} | {accuracy} | |")
    table = "\n".join(lines)
    print("\n" + table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
