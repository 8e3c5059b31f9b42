"""``model.onnx`` and ``model.int8.onnx``: the compressed model in the runtime a user would otherwise pick.

``model.onnx`` is the compressed float model (dynamic batch, opset 18), checked by a fresh ONNX
Runtime session against the in-memory model. ``model.int8.onnx`` is made by ONNX Runtime's own
quantizer from that file, calibrated on the same batches as the PyTorch INT8 model. Which
format and types are fastest depends on the CPU's instructions (measured here on an AVX-512
VNNI EPYC: QDQ S8S8 per-channel ran 4x slower than U8S8 at batch 1), so the candidates are
timed on the worker's CPU and the fastest is kept; the check names it and every candidate's
figures. A model either cannot take gets no such artifact and a warning naming why; the other
artifacts do not depend on these.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compactor.catalogue import EXPORTERS
from worker.compression.context import first_line, is_memory_exhaustion, limited
from worker.compression.export import SavedFile, _max_abs_diff, _write_atomically
from worker.compression.exporters.base import Exported, check_batch, float_reload_check
from worker.compression.onnx_runtime import INPUT_NAME, OnnxExportFailed, OnnxModel, _quiet_onnx, export_onnx
from worker.compression.trial import Trial, Workbench

# Candidate INT8 forms are ranked on these batch sizes, a few calls each: enough to tell a 4x
# difference apart, cheap next to the job.
_PROBE_BATCHES = (1, 8)
_PROBE_SECONDS = 0.4
_PROBE_MAX_RUNS = 10
_CLEARLY_FASTER = 0.95


def _threads() -> int:
    return torch.get_num_threads()


class OnnxExporter:
    name = "onnx"

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported | None:
        model = trial.float_model.to("cpu").eval()
        path = directory / EXPORTERS[self.name].artifact
        try:
            saved = export_onnx(model, bench.example, path)
            reloaded = OnnxModel(path, _threads())
            check = float_reload_check(model, reloaded, bench)
        except Exception as error:  # an op ONNX or ONNX Runtime lacks, and the like
            if is_memory_exhaustion(error):
                raise
            path.unlink(missing_ok=True)
            bench.ctx.warn(f"no model.onnx: the compressed model does not export to ONNX ({_why(error)})")
            return None
        difference = check["max_abs_diff"]
        if not check["ok"]:
            path.unlink(missing_ok=True)
            bench.ctx.warn(f"no model.onnx: ONNX Runtime does not reproduce the compressed model (max abs diff {difference:.3g})")
            return None
        return Exported(artifact=path.name, saved=saved, check=check, runnable=reloaded)


def _why(error: BaseException) -> str:
    if isinstance(error, OnnxExportFailed):
        return str(error)[:400]
    return f"{type(error).__name__}: {first_line(error, 240)}"


@dataclass(frozen=True)
class _Form:
    """One INT8 form ONNX Runtime's quantizer can write."""

    name: str
    quant_format: str  # "QDQ" | "QOperator"
    activations: str  # "QInt8" | "QUInt8"
    reduce_range: bool = False


_STATIC_FORMS = (
    _Form("qdq_u8s8", "QDQ", "QUInt8"),
    _Form("qdq_s8s8", "QDQ", "QInt8"),
    _Form("qoperator_u8s8", "QOperator", "QUInt8"),
    # 7-bit weights: the form for CPUs without VNNI, where U8S8 products can saturate.
    _Form("qdq_u8s8_reduce_range", "QDQ", "QUInt8", reduce_range=True),
)
# Dynamic INT8 is PyTorch's "Linear and RNN weights": the same layers here.
_DYNAMIC_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather"]


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over the job's calibration batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # pragma: no cover - ORT calls it only for some calibrators
        pass


def _calibration(bench: Workbench, trial: Trial) -> list[np.ndarray]:
    count = max(1, int((trial.quantization or {}).get("calibration_batches") or 1))
    source = bench.calibration_batches(torch.device("cpu"))
    return [np.ascontiguousarray(inputs.numpy(), dtype=np.float32) for inputs, _targets in limited(source, count)]


def _probe_p50(model: Callable[[torch.Tensor], Any], bench: Workbench) -> dict[str, float]:
    timings: dict[str, float] = {}
    generator = torch.Generator().manual_seed(1)
    for batch in _PROBE_BATCHES:
        inputs = torch.randn([batch, *bench.example.shape[1:]], generator=generator)
        model(inputs)
        samples: list[float] = []
        spent = 0.0
        while len(samples) < _PROBE_MAX_RUNS and (len(samples) < 3 or spent < _PROBE_SECONDS):
            start = time.perf_counter()
            model(inputs)
            samples.append((time.perf_counter() - start) * 1000.0)
            spent += samples[-1] / 1000.0
        timings[f"batch_{batch}"] = float(np.median(samples))
    return timings


def _score(timings: dict[str, float]) -> float:
    return float(np.exp(np.mean(np.log(list(timings.values())))))


def _quantize(source: Path, target: Path, form: _Form | None, per_channel: bool, calibration: list[np.ndarray]) -> None:
    """``form`` None: dynamic INT8 (weights only, activations quantized per call)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with _quiet_onnx():
        if form is None:
            quantize_dynamic(source, target, op_types_to_quantize=_DYNAMIC_OPS, per_channel=per_channel, weight_type=QuantType.QInt8)
            return
        quantize_static(
            source,
            target,
            _CalibrationReader(calibration),  # type: ignore[arg-type]
            quant_format=QuantFormat[form.quant_format],
            activation_type=QuantType[form.activations],
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=form.reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _prepared(source: Path, scratch: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimization); the file as it is where that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = scratch / "preprocessed.onnx"
    try:
        with _quiet_onnx():
            quant_pre_process(str(source), str(target))
        return target
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; the plain file still quantizes
        return source


class OnnxInt8Exporter:
    name = "onnx_int8"

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported | None:
        assert trial.quantization is not None  # the catalogue writes it only for quantizing jobs
        path = directory / EXPORTERS[self.name].artifact
        try:
            return self._export(trial, bench, directory, path)
        except Exception as error:
            if is_memory_exhaustion(error):
                raise
            path.unlink(missing_ok=True)
            bench.ctx.warn(f"no model.int8.onnx: ONNX Runtime's quantizer could not quantize the compressed model ({_why(error)})")
            return None

    def _export(self, trial: Trial, bench: Workbench, directory: Path, path: Path) -> Exported | None:
        assert trial.quantization is not None
        model = trial.float_model.to("cpu").eval()
        static = trial.quantization["mode"] == "static"
        per_channel = bool(bench.spec.quantize.per_channel) if bench.spec.quantize is not None else True
        calibration = _calibration(bench, trial) if static else []
        with tempfile.TemporaryDirectory(prefix="compactor-onnx-int8-", dir=directory) as scratch_name:
            scratch = Path(scratch_name)
            float_file = directory / EXPORTERS["onnx"].artifact
            if not float_file.exists():
                float_file = export_onnx(model, bench.example, scratch / "float.onnx").path
            source = _prepared(float_file, scratch)
            forms: tuple[_Form | None, ...] = _STATIC_FORMS if static else (None,)
            candidates: list[dict[str, Any]] = []
            best: tuple[float, Path, _Form | None] | None = None
            for index, form in enumerate(forms):
                candidate = scratch / f"candidate{index}.onnx"
                name = form.name if form is not None else "dynamic_s8"
                try:
                    _quantize(source, candidate, form, per_channel, calibration)
                    timings = _probe_p50(OnnxModel(candidate, _threads()), bench)
                except Exception as error:  # one form failing leaves the others
                    if is_memory_exhaustion(error):
                        raise
                    candidates.append({"form": name, "error": _why(error)})
                    continue
                candidates.append({"form": name, "p50_ms": timings})
                # A later form must be clearly faster to win: the list runs from the most exact form
                # down, and reduce_range's 7-bit weights should not win on timing noise.
                if best is None or _score(timings) < best[0] * _CLEARLY_FASTER:
                    best = (_score(timings), candidate, form)
            if best is None:
                bench.ctx.warn(f"no model.int8.onnx: every INT8 form failed ({'; '.join(str(c.get('error')) for c in candidates)})")
                return None
            _score_ms, chosen, form = best
            saved = _write_atomically(path, lambda handle: handle.write(chosen.read_bytes()))
        return self._checked(model, bench, saved, form, per_channel, calibration, candidates)

    def _checked(
        self,
        model: torch.nn.Module,
        bench: Workbench,
        saved: SavedFile,
        form: _Form | None,
        per_channel: bool,
        calibration: list[np.ndarray],
        candidates: list[dict[str, Any]],
    ) -> Exported:
        reloaded = OnnxModel(saved.path, _threads())
        inputs = check_batch(bench)
        with torch.no_grad():
            reference = model(inputs)
        actual = reloaded(inputs)
        difference, scale = _max_abs_diff(reference, actual)
        check: dict[str, Any] = {
            # A different quantizer: its outputs are compared with the float model for the record;
            # its accuracy is measured like every artifact's, and the reload must run.
            "ok": bool(torch.isfinite(actual).all()),
            "int8": True,
            "max_abs_diff_vs_float": difference,
            "output_scale": scale,
            "quantizer": "onnxruntime.quantization",
            "mode": "static" if form is not None else "dynamic",
            "form": form.name if form is not None else "dynamic_s8",
            "per_channel": per_channel,
            "calibration_batches": len(calibration),
            "candidates": candidates,
        }
        return Exported(artifact=saved.path.name, saved=saved, check=check, runnable=reloaded)
