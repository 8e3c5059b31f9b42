"""The whole core, end to end, on real models and real data."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from compactor.errors import Cancelled, CompactorError
from compactor.jobs import Stage
from compactor.spec import JobSpec
from tests.support.models import TinyCNN, top1
from worker.compression.loading import LoadedModel, load_model
from worker.compression.pipeline import BenchmarkOptions, compress, compress_files

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

QUICK = BenchmarkOptions(warmup=1, runs=3)


def _spec(**sections) -> JobSpec:
    return JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, **sections})


def _load_in_fresh_process(path: Path, shape: list[int]) -> list[int]:
    """Load model.ts (torch.jit.load) or model.pt2 (torch.export.load) with plain torch in a new
    interpreter (no Compactor import) and run it."""
    load = f"torch.export.load({str(path)!r}).module()" if path.suffix == ".pt2" else f"torch.jit.load({str(path)!r})"
    code = f"import sys, torch\nm = {load}\nprint(list(m(torch.randn({shape})).shape))\n"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_channel_prune_finetune_int8_keeps_accuracy_and_shrinks(tiny_cnn, digits, digits_split, tmp_path) -> None:
    _, _, test_x, test_y = digits
    before = top1(tiny_cnn, test_x, test_y)
    assert before >= 0.90
    spec = _spec(
        prune={"granularity": "channel", "amount": 0.5},
        finetune={"epochs": 2, "lr": 0.01},
        quantize={"mode": "static"},
    )
    seen: list[tuple[str, float]] = []
    result = compress(tiny_cnn, spec, digits_split, progress=lambda stage, f: seen.append((stage, f)), out_dir=tmp_path, benchmark=QUICK)
    after = top1(result.model, test_x, test_y)
    metrics = result.metrics
    assert before - after <= 0.03, (before, after)
    assert metrics["ratios"]["size"] <= 0.3
    assert metrics["ratios"]["macs"] <= 0.35
    assert metrics["export_check"]["ok"] is True
    # progress is monotonic and stays below 1.0 (1.0 is the worker's "succeeded")
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0 and fractions[-1] > 0.9
    assert {stage for stage, _ in seen} >= {"score", "prune", "finetune", "quantize", "export", "benchmark"}
    assert all(isinstance(stage, Stage) for stage, _ in seen)  # never a free string (the lease stores Stage)
    # contract metrics are present
    for side in ("original", "compressed"):
        block = metrics[side]
        assert block["params"] > 0 and block["size_bytes"] > 0 and block["macs"] > 0
        assert set(block["latency_ms"]["cpu"]) == {"batch_1", "batch_32"}
        assert block["accuracy"]["top1"] > 0.9
    assert metrics["compressed"]["params"] < metrics["original"]["params"]
    assert 0.0 < metrics["fidelity"]["top1_agreement"] <= 1.0
    layer = next(row for row in metrics["layers"] if row["name"] == "features.3")
    assert layer["channels_after"] < layer["channels_before"] == 64
    head = next(row for row in metrics["layers"] if row["name"] == "classifier")
    assert head["channels_after"] == head["channels_before"] == 10
    assert metrics["quantization"]["mode"] == "static"
    assert metrics["environment"]["cpu_threads"] >= 1
    # every artifact by default: TorchScript, torch.export, ONNX float and INT8, and the report;
    # no model.pt since the architecture changed
    assert set(result.artifacts) == {"model.ts", "model.pt2", "model.onnx", "model.int8.onnx", "report.json"}
    assert json.loads((tmp_path / "report.json").read_text())["ratios"] == metrics["ratios"]
    assert _load_in_fresh_process(tmp_path / "model.ts", [3, 1, 8, 8]) == [3, 10]
    # model.pt2 is the float compressed model (torch.export cannot carry torch.ao's INT8 weights), and says so.
    assert metrics["artifact_checks"]["model.pt2"]["ok"] and metrics["artifact_checks"]["model.pt2"]["int8"] is False
    assert any("model.pt2 holds the float compressed model" in warning for warning in metrics["warnings"])
    assert _load_in_fresh_process(tmp_path / "model.pt2", [5, 1, 8, 8]) == [5, 10]


def test_unstructured_iterative_prune_keeps_sparsity_and_says_it_does_not_shrink(tiny_cnn, digits_split, tmp_path) -> None:
    spec = _spec(
        prune={"granularity": "unstructured", "amount": 0.6, "steps": 2, "criterion": "taylor"},
        finetune={"epochs": 2, "lr": 0.01, "optimizer": "adamw"},
    )
    result = compress(tiny_cnn, spec, digits_split, out_dir=tmp_path, benchmark=QUICK)
    layers = result.metrics["layers"]
    weights = sum(row["params"] for row in layers if row["name"] != "classifier")
    zeros = sum(row["params"] * row["sparsity"] for row in layers if row["name"] != "classifier")
    assert zeros / weights == pytest.approx(0.6, abs=0.01)
    assert result.metrics["compressed"]["nonzero_params"] < 0.5 * result.metrics["original"]["nonzero_params"]
    assert any("do not shrink" in note for note in result.metrics["notes"])
    # the architecture did not change: model.pt loads into a fresh TinyCNN, zeros included
    fresh = TinyCNN()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    convs = [module.weight for module in fresh.modules() if isinstance(module, torch.nn.Conv2d)]
    zero_fraction = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert zero_fraction == pytest.approx(0.6, abs=0.01)


def test_target_search_reports_every_point_and_meets_a_loose_budget(tiny_cnn, digits_split) -> None:
    spec = _spec(
        prune={"granularity": "channel", "amount": 0.5},
        finetune={"epochs": 1, "lr": 0.01},
        target={"max_accuracy_drop": 0.05, "max_trials": 3},
    )
    result = compress(tiny_cnn, spec, digits_split, benchmark=QUICK)
    search = result.metrics["search"]
    assert search["budget_met"] is True
    assert search["chosen_amount"] == 0.5 and len(search["points"]) == 1
    assert search["points"][0]["within_budget"] is True


def test_target_search_that_cannot_meet_the_budget_returns_the_best_point(tiny_cnn, digits_split) -> None:
    spec = _spec(
        prune={"granularity": "channel", "amount": 0.9, "criterion": "random"},
        target={"max_accuracy_drop": 0.0, "max_trials": 2},
    )
    result = compress(tiny_cnn, spec, digits_split, benchmark=QUICK)
    search = result.metrics["search"]
    assert search["budget_met"] is False
    assert search["missed_by"] > 0
    assert [point["amount"] for point in search["points"]] == [0.9, 0.45]
    best = max(search["points"], key=lambda point: point["top1"])
    assert search["chosen_amount"] == best["amount"]


def test_cancellation_stops_between_batches(tiny_cnn, digits_split) -> None:
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    spec = _spec(prune={"granularity": "channel", "amount": 0.3}, finetune={"epochs": 50})
    with pytest.raises(Cancelled):
        compress(tiny_cnn, spec, digits_split, should_cancel=should_cancel, benchmark=QUICK)
    assert calls["n"] == 6


def test_without_a_dataset_quantizes_on_random_inputs_and_says_why_there_is_no_accuracy(tiny_cnn) -> None:
    result = compress(tiny_cnn, _spec(quantize={"mode": "dynamic"}), None, benchmark=QUICK)
    metrics = result.metrics
    assert metrics["original"]["accuracy"] is None and metrics["compressed"]["accuracy"] is None
    assert any("no dataset" in note for note in metrics["notes"])
    assert metrics["environment"]["dataset"]["synthetic"] is True
    assert {row["name"] for row in metrics["quantization"]["float_layers"]} >= {"features.0"}
    assert 0.0 <= metrics["fidelity"]["output_cosine"] <= 1.0


def test_torchscript_upload_unstructured_and_static_int8(tiny_cnn, digits_split, tmp_path) -> None:
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(tiny_cnn), path)
    loaded = load_model(path, JobSpec().model, trusted_code=True)
    assert loaded.scripted
    spec = _spec(prune={"granularity": "unstructured", "amount": 0.5}, finetune={"epochs": 1}, quantize={"mode": "static"})
    result = compress(loaded, spec, digits_split, out_dir=tmp_path / "out", benchmark=QUICK)
    assert result.metrics["compressed"]["accuracy"]["top1"] > 0.85
    assert result.metrics["ratios"]["size"] < 0.5
    assert result.metrics["environment"]["model_format"] == "torchscript"


@pytest.mark.parametrize("compile_with", ["trace", "script"])
def test_a_torchscript_upload_becomes_a_graph_and_loses_channels_like_the_module(tiny_cnn, digits_split, tmp_path, compile_with) -> None:
    example = digits_split.train.inputs[:2]
    program = torch.jit.trace(tiny_cnn, example) if compile_with == "trace" else torch.jit.script(tiny_cnn)
    path = tmp_path / "tiny.ts"
    torch.jit.save(program, path)
    spec = _spec(prune={"granularity": "channel", "amount": 0.5})
    result = compress(load_model(path, JobSpec().model, trusted_code=True), spec, digits_split, out_dir=tmp_path / "out", benchmark=QUICK)
    by_module = compress(copy.deepcopy(tiny_cnn), spec, digits_split, benchmark=QUICK)
    metrics = result.metrics
    assert metrics["ratios"]["macs"] == pytest.approx(by_module.metrics["ratios"]["macs"], abs=0.02)
    assert metrics["ratios"]["macs"] < 0.4 and metrics["ratios"]["size"] < 0.4
    structure = metrics["environment"]["structure"]
    assert structure["converted_from"] == "torchscript" and structure["graph"] == "torch.export"
    assert structure["layers_rebuilt"] == 7 and structure["calls_left"] == []
    # The layer table keeps the upload's own names.
    assert {row["name"] for row in metrics["layers"]} == {row["name"] for row in by_module.metrics["layers"]}
    assert _load_in_fresh_process(tmp_path / "out" / "model.ts", [3, 1, 8, 8]) == [3, 10]


def test_a_torchscript_program_the_converter_cannot_express_says_so(digits_split, tmp_path) -> None:
    from tests.support.architectures import DataDependentLoop

    path = tmp_path / "loop.ts"
    torch.jit.save(torch.jit.script(DataDependentLoop().eval()), path)
    with pytest.raises(CompactorError) as info:
        compress(load_model(path, JobSpec().model, trusted_code=True), _spec(prune={"granularity": "channel"}), digits_split)
    assert info.value.code == "unsupported_combination" and info.value.field == "prune.granularity"
    assert "prim::Loop" in str(info.value) and "unstructured" in str(info.value)
    # Without channels it is compressed as the program it is, and the report says why.
    spec = _spec(prune={"granularity": "unstructured", "amount": 0.5})
    metrics = compress(load_model(path, JobSpec().model, trusted_code=True), spec, digits_split, benchmark=QUICK).metrics
    assert metrics["environment"]["structure"]["graph"] is None
    assert "prim::Loop" in metrics["environment"]["structure"]["conversion_failed"]
    assert any("could not be converted" in note and "prim::Loop" in note for note in metrics["notes"])
    assert metrics["ratios"]["nonzero_params"] < 0.6


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "mobilenet_v3_small"])
def test_channel_pruning_of_torchvision_models_exports_loadable_torchscript(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 32, 32]}, "prune": {"granularity": "channel", "amount": 0.5}})
    result = compress(
        LoadedModel(module=model, format="state_dict", scripted=False, arch=arch),
        spec,
        None,
        out_dir=tmp_path,
        benchmark=BenchmarkOptions(warmup=1, runs=2),
    )
    assert result.metrics["ratios"]["params"] < 0.6
    assert result.metrics["ratios"]["macs"] < 0.6
    assert _load_in_fresh_process(tmp_path / "model.ts", [2, 3, 32, 32]) == [2, 10]


def _state_dict_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "case, code",
    [
        ("truncated", "invalid_model"),
        ("random_bytes", "unsupported_model_format"),
        ("pickled_module", "unsafe_model"),
        ("wrong_arch", "invalid_model"),
        ("mismatched_dataset", "invalid_dataset"),
        ("nan_dataset", "invalid_dataset"),
    ],
)
def test_bad_inputs_fail_with_their_code(case: str, code: str, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({"model": {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}}, "quantize": {"mode": "dynamic"}})
    model_path = _state_dict_file(tmp_path)
    dataset_path = None
    if case == "truncated":
        model_path.write_bytes(model_path.read_bytes()[:5000])
    elif case == "random_bytes":
        model_path.write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes())
    elif case == "pickled_module":
        torch.save(TinyCNN(), model_path)  # unsafe-on-purpose
    elif case == "wrong_arch":
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"arch": "resnet34"})})
    elif case == "mismatched_dataset":
        dataset_path = tmp_path / "data.pt"
        torch.save({"inputs": torch.randn(10, 3, 32, 32), "targets": torch.zeros(9, dtype=torch.long)}, dataset_path)
    elif case == "nan_dataset":
        dataset_path = tmp_path / "data.pt"
        inputs = torch.randn(10, 3, 32, 32)
        inputs[3, 0, 0, 0] = float("nan")
        torch.save({"inputs": inputs, "targets": torch.zeros(10, dtype=torch.long)}, dataset_path)
    with pytest.raises(CompactorError) as info:
        compress_files(model_path, spec, tmp_path / "out", dataset_path=dataset_path, benchmark=QUICK, trusted_code=True)
    assert info.value.code == code, info.value.message
    assert "Traceback" not in info.value.message


def test_cancellation_is_also_checked_between_stages_without_batches(tiny_cnn) -> None:
    # No dataset and only a quantize stage: no training batch ever checks, the stage boundaries must.
    stages: list[str] = []
    spec = _spec(quantize={"mode": "dynamic"})
    with pytest.raises(Cancelled):
        compress(
            tiny_cnn,
            spec,
            None,
            progress=lambda stage, _: stages.append(stage),
            should_cancel=lambda: "export" in stages,
            benchmark=QUICK,
        )
    assert "benchmark" not in stages


@pytest.mark.parametrize("steps", [1, 3])
def test_the_progress_plan_is_the_sum_of_the_passes(tiny_cnn, digits_split, steps: int) -> None:
    """The plan is what the passes say they will do: the bar reaches its ceiling exactly at the
    end, never early (an under-planned run) nor short of it (an over-planned one)."""
    from worker.compression.progress import CEILING

    spec = _spec(prune={"granularity": "unstructured", "amount": 0.4, "steps": steps}, finetune={"epochs": 4}, quantize={"mode": "dynamic"})
    seen: list[tuple[str, float]] = []
    compress(tiny_cnn, spec, digits_split, progress=lambda stage, f: seen.append((stage, f)), benchmark=QUICK)
    assert seen[-1] == (Stage.benchmark, pytest.approx(CEILING))
    first_at_ceiling = next(index for index, (_, fraction) in enumerate(seen) if fraction >= CEILING - 1e-9)
    assert seen[first_at_ceiling][0] == Stage.benchmark
    # Pruning in steps fine-tunes between them: finetune progress appears before the last prune.
    order = [stage for stage, _ in seen]
    if steps > 1:
        assert order.index(Stage.finetune) < len(order) - 1 - order[::-1].index(Stage.prune)


def test_batchnorm_statistics_describe_the_fine_tuned_weights(tiny_cnn, digits_split) -> None:
    """A short fine-tune moves weights faster than BatchNorm's running statistics follow; the
    pipeline re-estimates them afterwards, so evaluation and the exported model see statistics
    of the final weights (without it a 50%-channel resnet18 fell from 0.84 to 0.20 top-1)."""
    spec = _spec(prune={"granularity": "channel", "amount": 0.5}, finetune={"epochs": 1, "lr": 0.05})
    result = compress(tiny_cnn, spec, digits_split, benchmark=QUICK)
    model = result.model.eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    # Exact statistics of the training split through the final weights, layer by layer.
    captured: dict[torch.nn.Module, list[torch.Tensor]] = {norm: [] for norm in norms}
    hooks = [norm.register_forward_pre_hook(lambda m, args: captured[m].append(args[0].detach())) for norm in norms]
    with torch.no_grad():
        model(digits_split.train.inputs)
    for hook in hooks:
        hook.remove()
    for norm in norms:
        features = captured[norm][0].transpose(0, 1).flatten(1)
        torch.testing.assert_close(norm.running_mean, features.mean(dim=1), atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(norm.running_var, features.var(dim=1), atol=2e-3, rtol=5e-2)


# -- one set of combination rules for the gateway and compress() (compactor/compat.py)


def test_compress_refuses_what_the_gateway_refuses_with_the_same_words(tiny_cnn) -> None:
    from compactor.errors import UnsupportedCombination

    # The core used to allow a finetune section with 0 epochs and no data; the gateway never did.
    with pytest.raises(UnsupportedCombination, match="fine-tuning needs data") as info:
        compress(tiny_cnn, _spec(finetune={"epochs": 0}), None, benchmark=QUICK)
    assert info.value.field == "finetune"
    with pytest.raises(UnsupportedCombination, match="scores weights by gradients") as info:
        compress(tiny_cnn, _spec(prune={"criterion": "taylor", "granularity": "unstructured"}), None, benchmark=QUICK)
    assert info.value.field == "prune.criterion"
