"""model.onnx, model.int8.onnx and the runtime table: real exports, real ONNX Runtime sessions,
artifacts loaded in a fresh interpreter that imports nothing of Compactor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compactor.errors import UnsupportedCombination
from compactor.spec import JobSpec
from worker.compression.onnx_runtime import OnnxModel
from worker.compression.pipeline import BenchmarkOptions, compress
from worker.compression.runtimes import DEFAULT_ACCURACY_SLACK, ORIGINAL, add_speedups, recommend

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

QUICK = BenchmarkOptions(warmup=1, runs=3)


def _spec(**sections) -> JobSpec:
    return JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, **sections})


def _run_in_fresh_process(path: Path, inputs: np.ndarray, tmp_path: Path) -> np.ndarray:
    """Run an ONNX file with plain onnxruntime in a new interpreter (no Compactor, no torch)."""
    np.save(tmp_path / "inputs.npy", inputs)
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        f"x = np.load({str(tmp_path / 'inputs.npy')!r})\n"
        f"np.save({str(tmp_path / 'outputs.npy')!r}, s.run(None, {{s.get_inputs()[0].name: x}})[0])\n"
        "assert 'torch' not in sys.modules and 'compactor' not in sys.modules and 'worker' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "outputs.npy")


def test_onnx_artifacts_load_in_a_fresh_process_and_match_the_in_memory_models(tiny_cnn, digits, digits_split, tmp_path) -> None:
    _, _, test_x, test_y = digits
    spec = _spec(prune={"granularity": "channel", "amount": 0.5}, quantize={"mode": "static", "calibration_batches": 4})
    result = compress(tiny_cnn, spec, digits_split, out_dir=tmp_path / "out", benchmark=QUICK)
    metrics = result.metrics
    assert {"model.ts", "model.pt2", "model.onnx", "model.int8.onnx", "report.json"} <= set(result.artifacts)
    inputs = test_x[:16].numpy()

    # model.onnx is the compressed float model: the reloaded model.pt2 (a float program) is the reference.
    float_model = torch.export.load(str(result.artifacts["model.pt2"])).module()
    with torch.no_grad():
        expected_float = float_model(torch.from_numpy(inputs)).numpy()
    fresh_float = _run_in_fresh_process(result.artifacts["model.onnx"], inputs, tmp_path)
    np.testing.assert_allclose(fresh_float, expected_float, rtol=1e-4, atol=1e-4)

    # model.int8.onnx: the fresh process computes what the job's own session computed.
    in_memory = OnnxModel(result.artifacts["model.int8.onnx"], threads=1)(torch.from_numpy(inputs)).numpy()
    fresh_int8 = _run_in_fresh_process(result.artifacts["model.int8.onnx"], inputs, tmp_path)
    np.testing.assert_allclose(fresh_int8, in_memory, rtol=1e-5, atol=1e-5)
    # A different quantizer, calibrated on the job's own batches: it classifies like the float model.
    assert (fresh_int8.argmax(1) == expected_float.argmax(1)).mean() >= 0.9

    check = metrics["artifact_checks"]["model.int8.onnx"]
    assert check["ok"] and check["int8"] and check["calibration_batches"] == metrics["quantization"]["calibration_batches"] == 4
    assert check["form"] in {candidate["form"] for candidate in check["candidates"] if "p50_ms" in candidate}
    assert metrics["artifact_checks"]["model.onnx"]["ok"]


def test_the_runtime_table_has_every_artifact_and_the_recommendation_is_the_fastest_within_budget(tiny_cnn, digits_split, tmp_path) -> None:
    spec = _spec(prune={"granularity": "channel", "amount": 0.3}, quantize={"mode": "static"})
    metrics = compress(tiny_cnn, spec, digits_split, out_dir=tmp_path, benchmark=QUICK).metrics
    rows = metrics["runtimes"]
    assert {(row["artifact"], row["runtime"]) for row in rows} == {
        (None, "torchscript"),
        (None, "onnxruntime"),
        ("model.ts", "torchscript"),
        ("model.pt2", "torch.export"),
        ("model.onnx", "onnxruntime"),
        ("model.int8.onnx", "onnxruntime"),
    }
    compressed = [row for row in rows if row["model"] != ORIGINAL]
    assert all(row["accuracy"] is not None and 0.0 <= row["top1_agreement"] <= 1.0 for row in compressed)
    best_top1 = max(row["accuracy"]["top1"] for row in compressed)
    for batch in ("batch_1", "batch_32"):
        choice = metrics["recommended"][batch]
        assert choice["accuracy_floor"] == pytest.approx(best_top1 - DEFAULT_ACCURACY_SLACK)
        eligible = [row for row in compressed if row["accuracy"]["top1"] >= choice["accuracy_floor"] - 1e-9]
        fastest = min(eligible, key=lambda row: row["latency_ms"][batch]["p50"])
        assert choice["artifact"] == fastest["artifact"]
        best_original = min(row["latency_ms"][batch]["p50"] for row in rows if row["model"] == ORIGINAL)
        assert metrics["ratios"][f"speedup_batch_{batch.removeprefix('batch_')}"] == pytest.approx(best_original / choice["p50_ms"], rel=1e-4)
        for row in rows:
            assert row["latency_ms"][batch]["runs"] >= 1
    if any(choice["speedup"] < 1.0 for choice in metrics["recommended"].values()):
        assert metrics["warnings"][0].startswith("nothing faster than the original was found")


class _LgammaHead(nn.Module):
    """A classifier whose head no ONNX exporter can express (aten::lgamma: no ONNX operator)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(self.head(self.features(x)).abs() + 1.0)


def test_a_model_onnx_cannot_export_succeeds_with_the_other_artifacts_and_says_why(digits_split, tmp_path) -> None:
    torch.manual_seed(0)
    spec = _spec(quantize={"mode": "static", "calibration_batches": 2})
    result = compress(_LgammaHead().eval(), spec, digits_split, out_dir=tmp_path, benchmark=QUICK)
    assert "model.ts" in result.artifacts and "model.onnx" not in result.artifacts and "model.int8.onnx" not in result.artifacts
    warnings = result.metrics["warnings"]
    assert any(w.startswith("no model.onnx") and "lgamma" in w for w in warnings), warnings
    assert any(w.startswith("no model.int8.onnx") for w in warnings), warnings
    assert any("original was not timed in ONNX Runtime" in w for w in warnings), warnings
    assert {row["runtime"] for row in result.metrics["runtimes"]} <= {"torchscript", "torch.export"}


def test_spec_artifacts_chooses_what_is_written(tiny_cnn, digits_split, tmp_path) -> None:
    spec = _spec(quantize={"mode": "dynamic"}, artifacts=["model.onnx"])
    result = compress(tiny_cnn, spec, digits_split, out_dir=tmp_path, benchmark=QUICK)
    # model.ts (the reference) and report.json come whatever the list says.
    assert set(result.artifacts) == {"model.ts", "model.onnx", "report.json"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.ts", "report.json"]


@pytest.mark.parametrize(
    ("sections", "wanted", "says"),
    [
        ({}, ["model.int8.onnx"], "does not quantize"),
        ({"prune": {"granularity": "channel", "amount": 0.3}}, ["model.onnx", "model.pt"], "channel pruning changes it"),
    ],
)
def test_an_artifact_the_job_cannot_have_is_refused_naming_it(tiny_cnn, sections, wanted, says) -> None:
    with pytest.raises(UnsupportedCombination, match=says) as refused:
        compress(tiny_cnn, _spec(**sections, artifacts=wanted), None, benchmark=QUICK)
    assert refused.value.field == f"artifacts.{len(wanted) - 1}"


def _row(artifact: str | None, runtime: str, b1: float, b32: float, top1: float | None) -> dict:
    return {
        "model": ORIGINAL if artifact is None else "compressed",
        "artifact": artifact,
        "runtime": runtime,
        "precision": "fp32",
        "latency_ms": {"batch_1": {"p50": b1}, "batch_32": {"p50": b32}},
        **({} if artifact is None else {"accuracy": None if top1 is None else {"top1": top1}, "top1_agreement": 1.0}),
    }


def test_recommend_keeps_the_budget_and_reports_both_speedups() -> None:
    rows = [
        _row(None, "torchscript", 4.0, 12.0, None),
        _row(None, "onnxruntime", 0.5, 8.0, None),
        _row("model.ts", "torchscript", 0.7, 1.5, 0.95),
        _row("model.onnx", "onnxruntime", 0.12, 1.9, 0.95),
        _row("model.int8.onnx", "onnxruntime", 0.05, 1.0, 0.90),  # fastest, but 5 points worse
    ]
    best = add_speedups(rows)
    assert best == {"batch_1": 0.5, "batch_32": 8.0}
    chosen = recommend(rows, original_top1=0.96, max_accuracy_drop=None)
    assert chosen["batch_1"]["artifact"] == "model.onnx" and chosen["batch_32"]["artifact"] == "model.ts"
    assert chosen["batch_1"]["speedup"] == pytest.approx(0.5 / 0.12) and chosen["batch_1"]["speedup_same_runtime"] == pytest.approx(0.5 / 0.12)
    assert chosen["batch_32"]["speedup"] == pytest.approx(8.0 / 1.5) and chosen["batch_32"]["speedup_same_runtime"] == pytest.approx(12.0 / 1.5)
    # A target that allows 7 points lets the INT8 ONNX model in.
    loose = recommend(rows, original_top1=0.96, max_accuracy_drop=0.07)
    assert loose["batch_1"]["artifact"] == loose["batch_32"]["artifact"] == "model.int8.onnx"


def test_a_job_whose_artifacts_are_all_slower_says_so_first() -> None:
    from worker.compression.report import _slower_warning

    rows = [_row(None, "onnxruntime", 0.5, 8.0, None), _row("model.ts", "torchscript", 0.9, 4.0, 0.9)]
    best = add_speedups(rows)
    chosen = recommend(rows, original_top1=0.9, max_accuracy_drop=None)
    warning = _slower_warning(chosen, best)
    assert warning is not None and warning.startswith("nothing faster than the original was found at batch 1 ")
    assert "batch 32" not in warning


def test_the_report_documents_read_the_runtime_table(tiny_cnn, digits_split, tmp_path) -> None:
    from compactor.documents import Report

    metrics = compress(tiny_cnn, _spec(prune={"granularity": "channel", "amount": 0.3}), digits_split, out_dir=tmp_path, benchmark=QUICK).metrics
    report = Report.model_validate(json.loads((tmp_path / "report.json").read_text()))
    assert len(report.runtimes) == len(metrics["runtimes"]) >= 4
    assert set(report.recommended) == {"batch_1", "batch_32"}
