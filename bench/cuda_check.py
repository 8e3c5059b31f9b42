"""Proves the CUDA path of the core on a GPU machine (prints what ran where).

    python -m bench.cuda_check

Trains resnet18 on digits on the GPU, then runs channel pruning + fine-tuning
(+ INT8, which calibrates and runs on the CPU) with ``device: auto`` and checks
that scoring and fine-tuning used the GPU and that CUDA latency was measured.
"""

from __future__ import annotations

import json
import time

import torch

from bench.core import digits_rgb32, top1, train_resnet18
from compactor.spec import JobSpec
from worker.compression.data import Dataset, split_dataset
from worker.compression.pipeline import BenchmarkOptions, compress


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device visible"
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    train_x, train_y, test_x, test_y = digits_rgb32()
    start = time.perf_counter()
    model = train_resnet18(train_x, train_y, epochs=6).cpu()
    print(f"trained on CPU in {time.perf_counter() - start:.1f} s, test top-1 {top1(model, test_x, test_y):.2%}")
    data = split_dataset(Dataset(inputs=train_x, targets=train_y), 0.2, 0)
    for name, raw in {
        "channel 50% + ft (float, GPU latency for both)": {"prune": {"granularity": "channel", "amount": 0.5}, "finetune": {"epochs": 4}},
        "channel 50% + ft + int8": {"prune": {"granularity": "channel", "amount": 0.5}, "finetune": {"epochs": 4}, "quantize": {"mode": "static"}},
    }.items():
        spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 32, 32]}, "device": "auto", **raw})
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = compress(model, spec, data, benchmark=BenchmarkOptions(runs=20))
        seconds = time.perf_counter() - start
        metrics = result.metrics
        peak = torch.cuda.max_memory_allocated()
        assert metrics["environment"]["device"] == "cuda", metrics["environment"]
        assert peak > 0, "nothing was allocated on the GPU"
        assert "cuda" in metrics["original"]["latency_ms"]
        print(f"\n== {name}: {seconds:.1f} s, GPU peak {peak / 2**20:.0f} MiB")
        print(
            json.dumps(
                {
                    "device": metrics["environment"]["device"],
                    "cuda_device": metrics["environment"]["cuda_device"],
                    "stages": metrics["stages"],
                    "val_top1": {"original": metrics["original"]["accuracy"]["top1"], "compressed": metrics["compressed"]["accuracy"]["top1"]},
                    "test_top1_compressed": top1(result.model.cpu(), test_x, test_y),
                    "latency_original": metrics["original"]["latency_ms"],
                    "latency_compressed": metrics["compressed"]["latency_ms"],
                    "ratios": metrics["ratios"],
                    "warnings": metrics["warnings"],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
