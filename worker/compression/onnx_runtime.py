"""ONNX export and ONNX Runtime sessions: the runtime a user who skips Compactor would deploy in.

    path = export_onnx(model, example, directory / "model.onnx")
    runnable = OnnxModel(path, threads=2)   # a callable: torch tensor in, torch tensor out

``OnnxModel`` is what the benchmark, the accuracy evaluation and the reload checks call, the
same way they call a ScriptModule. Sessions never spin waiting for work
(``session.intra_op.allow_spinning=0``): models timed back to back in one process would
otherwise leave spinning threads that steal the next model's cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.compression.context import first_line, is_memory_exhaustion
from worker.compression.export import SavedFile, _write_atomically

OPSET = 18
MAX_BATCH = 4096
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages for a terminal


class OnnxExportFailed(Exception):
    """Neither ONNX exporter could express the model; the message names why."""


def _not_from_onnxruntime(record: logging.LogRecord) -> bool:
    # onnxruntime.quantization logs its advice through the root logger, not a logger of its own.
    return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_onnx() -> Iterator[None]:
    # The exporters narrate every pass (and warn that the TorchScript-based one is legacy).
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch._export", "torch.export")]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        root.addFilter(_not_from_onnxruntime)
        try:
            yield
        finally:
            root.removeFilter(_not_from_onnxruntime)
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _two_samples(example: torch.Tensor) -> torch.Tensor:
    # A dimension whose example size is 1 is specialised by torch.export: trace with two samples.
    return example.expand(2, *example.shape[1:]).clone() if example.shape[0] == 1 else example


def _via_torchscript_exporter(model: nn.Module, inputs: torch.Tensor) -> bytes:
    with tempfile.TemporaryDirectory(prefix="compactor-onnx-") as scratch:
        target = Path(scratch) / "model.onnx"
        torch.onnx.export(
            model,
            (inputs,),
            str(target),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        return target.read_bytes()


def _via_torch_export_exporter(model: nn.Module, inputs: torch.Tensor) -> bytes:
    program = torch.onnx.export(
        model,
        (inputs,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
        # ONNX Runtime optimizes the graph itself when it loads it; the exporter's own optimizer
        # would double the export time (3.6 s against 1.7 s on resnet18).
        optimize=False,
        verbose=False,
    )
    assert program is not None
    return program.model_proto.SerializeToString()


def _model_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as ONNX bytes: the TorchScript-based exporter first, torch.export's where it fails.

    Both ship with torch 2.14.1. The torch.export-based one is the one torch keeps, but it builds
    its op registry on every call: 2-3 s per export even for an 8x8 CNN, against 0.1-0.3 s (and
    one job exports twice: the original's baseline and model.onnx). It stays the fallback for
    what tracing cannot express; a ScriptModule (a TorchScript upload that stayed a program) only
    the TorchScript-based one can take."""
    inputs = _two_samples(example.detach().cpu())
    exporters = [("TorchScript-based exporter", _via_torchscript_exporter)]
    if not isinstance(model, torch.jit.ScriptModule):
        exporters.append(("torch.export exporter", _via_torch_export_exporter))
    failures: list[str] = []
    for name, exporter in exporters:
        try:
            with _quiet_onnx():
                return exporter(model, inputs)
        except Exception as error:  # the exporters fail in many ways on what they cannot express
            if is_memory_exhaustion(error):
                raise
            failures.append(f"{name}: {type(error).__name__}: {first_line(error, 200)}")
    raise OnnxExportFailed(_ANSI.sub("", "; ".join(failures)))


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> SavedFile:
    """Write ``model`` (float, eval mode, CPU) as ONNX with a dynamic batch dimension, atomically."""
    with torch.no_grad():
        payload = _model_bytes(model.eval(), example)
    return _write_atomically(path, lambda handle: handle.write(payload))


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OnnxModel:
    """An ONNX Runtime CPU session that is called like a torch model (torch tensor in and out)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: array})[0])
