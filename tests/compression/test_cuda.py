"""The CUDA path of the core: scoring and fine-tuning on the GPU, INT8 on the CPU.

Skipped where no GPU is visible (CI has none); run on a GPU machine with
``pytest tests/compression/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from compactor.errors import InvalidSpec
from compactor.spec import JobSpec
from tests.support.models import top1
from worker.compression.pipeline import BenchmarkOptions, compress

QUICK = BenchmarkOptions(warmup=2, runs=5)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


@needs_cuda
@pytest.mark.parametrize("quantize", [None, {"mode": "static"}, {"mode": "dynamic"}])
def test_prune_and_finetune_run_on_the_gpu(tiny_cnn, digits, digits_split, quantize) -> None:
    _, _, test_x, test_y = digits
    sections = {"prune": {"granularity": "channel", "amount": 0.5, "criterion": "taylor"}, "finetune": {"epochs": 2}}
    if quantize:
        sections["quantize"] = quantize
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, "device": "cuda", **sections})
    torch.cuda.reset_peak_memory_stats()
    result = compress(tiny_cnn, spec, digits_split, benchmark=QUICK)
    metrics = result.metrics
    assert torch.cuda.max_memory_allocated() > 0
    assert metrics["environment"]["device"] == "cuda"
    assert "cuda" in metrics["original"]["latency_ms"]
    # a float result is also timed on the GPU; INT8 kernels exist only for the CPU
    assert ("cuda" in metrics["compressed"]["latency_ms"]) == (quantize is None)
    assert next(tiny_cnn.parameters()).device.type == "cpu", "the caller's model must stay where it was"
    model = result.model.cpu() if quantize is None else result.model
    assert top1(model, test_x, test_y) >= 0.9


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny_cnn, digits_split) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, "device": "cuda", "quantize": {"mode": "dynamic"}})
    with pytest.raises(InvalidSpec) as info:
        compress(tiny_cnn, spec, digits_split, benchmark=QUICK)
    assert info.value.field == "device"
