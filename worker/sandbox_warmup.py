"""Preloaded into the job fork server last: one tiny compression, so that every job child starts warm.

A child forked for a job inherits what its fork server has already done: modules imported
lazily on first use (torch.ao's FX quantization, Torch-Pruning's graph tracing, the
TorchScript frontend's compiled ``torch.nn.functional`` helpers), oneDNN's generated kernels
and the allocator's first pages. Done once here, it is not paid again in every job (measured
on two cores: a small job's own stage time 0.48 s in a cold child against 0.14 s in a warm
process).

Run on one thread and the CPU only: the fork server must not hold an OpenMP thread team or a
CUDA context when it forks (the children would inherit a broken one). Nothing of any upload is
involved: the model is built here from a fixed seed.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def warm_up() -> float:
    import torch
    from torch import nn

    from compactor.spec import parse_spec
    from worker.compression.data import synthetic_data
    from worker.compression.pipeline import BenchmarkOptions, compress

    started = time.perf_counter()
    _no_monitor_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
        ).eval()
        data = synthetic_data([1, 1, 8, 8], num_samples=32, seed=0)
        # No ONNX export or ONNX Runtime session here: they start native threads (the fork server
        # must fork with one thread) and cost seconds; jobs import them after the fork.
        quick = BenchmarkOptions(warmup=1, runs=1, batch_sizes=(1,), threads=1, onnx_baseline=False)
        specs = (
            {
                "model": {"input_shape": [1, 1, 8, 8]},
                "device": "cpu",
                "prune": {"amount": 0.25},
                "quantize": {"mode": "static", "calibration_batches": 1},
                "artifacts": ["model.ts", "model.pt2"],
            },
            {"model": {"input_shape": [1, 1, 8, 8]}, "device": "cpu", "quantize": {"mode": "dynamic"}, "artifacts": ["model.ts", "model.pt"]},
        )
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="compactor-warmup-") as out:
            warnings.simplefilter("ignore")
            for index, spec in enumerate(specs):
                subject = model if index == 0 else torch.jit.script(model)
                compress(subject, parse_spec(spec), data, out_dir=Path(out) / str(index), benchmark=quick)
    except Exception:  # a failed warm-up costs speed, never a job
        log.exception("warming up the job fork server failed; jobs start cold")
    finally:
        torch.set_num_threads(threads)
    running = threading.active_count()
    if running != 1:
        log.warning("the job fork server runs %d threads after its warm-up; forking it is unsafe", running)
    return time.perf_counter() - started


def _no_monitor_threads() -> None:
    """torch.export's tracer (model.pt2, TorchScript conversion) opens tqdm progress bars, and the
    first one starts tqdm's monitor thread. A fork server must stay single-threaded: a child forked
    while that thread holds tqdm's lock would wait on it for ever."""
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.monitor_interval = 0


warm_up()
