"""worker/compression/pt2.py: torch.export archives read without arbitrary unpickling.

Real archives written by torch.export.save, and real attacks built from them: a pickled weight
or sample input whose unpickling would run code, a script object among the constants, a graph
calling an op off the allowlist, damaged archives.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compactor.errors import InvalidModel, ModelTooLarge, UnsafeModel
from compactor.formats import detect_model_format
from compactor.spec import ModelSpec
from tests.support.models import TinyCNN
from worker.compression.loading import LoadLimits, load_model
from worker.compression.pt2 import load_exported_program


def _export(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return path


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return _export(TinyCNN(), tmp_path / "tiny.pt2", torch.randn(2, 1, 8, 8))


def _rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """A copy of ``source`` with entries (named without the top-level folder) replaced or added."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        prefix = original.namelist()[0].split("/", 1)[0]
        for info in original.infolist():
            inner = info.filename.split("/", 1)[1]
            copy.writestr(info, replace.pop(inner, original.read(info)))
        for inner, data in replace.items():
            copy.writestr(f"{prefix}/{inner}", data)
    return target


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return (subprocess.call, (["touch", str(self.marker)],))


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_an_exported_program_round_trips_exactly_with_its_dynamic_batch(archive: Path) -> None:
    assert detect_model_format(archive) == "pt2"
    reference = torch.export.load(archive).module()  # our own file: torch's loader is fine here
    program = load_exported_program(archive)
    module = program.module()
    for batch in (1, 5, 32):
        x = torch.randn(batch, 1, 8, 8)
        assert torch.equal(module(x), reference(x))
    assert {name for name, _ in program.named_parameters()} == {name for name, _ in TinyCNN().named_parameters()}


def test_a_pickled_weight_that_would_run_code_is_refused(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(archive) as original:
        prefix = original.namelist()[0].split("/", 1)[0]
        config = json.loads(original.read(f"{prefix}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"]))
    config["config"][first].update(use_pickle=True, path_name="weight_evil")
    evil = _rewrite(
        archive,
        tmp_path / "evil.pt2",
        {"data/weights/model_weights_config.json": json.dumps(config).encode(), "data/weights/weight_evil": _saved(_Touch(marker))},
    )
    with pytest.raises(UnsafeModel, match="weights_only=True"):
        load_exported_program(evil)
    assert not marker.exists()
    # torch's own loader runs it (then fails on what it got): this is what the reader is for.
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is that it ran the code first
        torch.export.load(evil)
    assert marker.exists()


def test_sample_inputs_that_would_run_code_are_refused(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _rewrite(archive, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": _saved(((_Touch(marker),), {}))})
    with pytest.raises(UnsafeModel, match="sample inputs"):
        load_exported_program(evil)
    assert not marker.exists()


def test_script_and_opaque_objects_among_the_constants_are_refused(archive: Path, tmp_path: Path) -> None:
    for path_name in ("custom_obj_0", "opaque_obj_0"):
        config = {"config": {"obj": {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}}}
        evil = _rewrite(
            archive,
            tmp_path / f"{path_name}.pt2",
            {"data/constants/model_constants_config.json": json.dumps(config).encode(), f"data/constants/{path_name}": pickle.dumps(1)},
        )
        with pytest.raises(UnsafeModel, match="script or opaque object"):
            load_exported_program(evil)


def test_a_graph_calling_an_op_off_the_allowlist_is_refused(tmp_path: Path) -> None:
    class Prints(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten._print("a side effect of calling the model")
            return x * 2

    path = _export(Prints(), tmp_path / "prints.pt2", torch.randn(2, 10))
    with pytest.raises(UnsafeModel, match="aten::_print"):
        load_exported_program(path)


def test_damaged_and_oversized_archives_are_invalid(archive: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(InvalidModel):
        load_exported_program(truncated)
    program_gone = _rewrite(archive, tmp_path / "nomodel.pt2", {"models/model.json": b"{not json"})
    with pytest.raises(InvalidModel):
        load_exported_program(program_gone)
    with pytest.raises(ModelTooLarge):
        load_exported_program(archive, LoadLimits(max_parameters=100))
    with pytest.raises(InvalidModel):
        detect_model_format(truncated)


def test_a_pt2_upload_is_channel_pruned_and_quantized_like_the_module(tiny_cnn, tmp_path: Path) -> None:
    """The .pt2 door end to end in the core: loaded safely, its layers rebuilt, then the same
    pipeline as an nn.Module: 50% channels + fine-tune + static INT8 reach the same MACs."""
    from compactor.spec import JobSpec
    from tests.support.jobs import write_digits_dataset
    from worker.compression.data import load_dataset, split_dataset
    from worker.compression.pipeline import BenchmarkOptions, compress, compress_files

    quick = BenchmarkOptions(warmup=1, runs=2)
    spec = JobSpec.model_validate(
        {"model": {"input_shape": [1, 1, 8, 8]}, "prune": {"granularity": "channel", "amount": 0.5}, "finetune": {"epochs": 1}, "quantize": {}}
    )
    dataset = write_digits_dataset(tmp_path / "digits.pt")
    archive = _export(tiny_cnn, tmp_path / "tiny.pt2", torch.randn(2, 1, 8, 8))
    result = compress_files(archive, spec, tmp_path / "out", dataset_path=dataset, benchmark=quick)
    metrics = result.metrics
    assert metrics["environment"]["model_format"] == "pt2"
    assert metrics["quantization"]["float_layers"] == []
    assert {row["name"] for row in metrics["layers"]} >= {"features.0", "features.3", "classifier"}
    by_module = compress(tiny_cnn, spec, split_dataset(load_dataset(dataset), spec.data.val_fraction, spec.data.seed), benchmark=quick)
    assert metrics["ratios"]["macs"] == pytest.approx(by_module.metrics["ratios"]["macs"], abs=0.02)
    assert metrics["compressed"]["accuracy"]["top1"] >= by_module.metrics["compressed"]["accuracy"]["top1"] - 0.05
    assert (tmp_path / "out" / "model.ts").is_file()


def test_a_program_with_data_dependent_control_flow_is_refused_clearly(tmp_path: Path) -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: self.head(t), lambda t: self.head(-t), (x,))

    path = tmp_path / "cond.pt2"
    torch.export.save(torch.export.export(Branches().eval(), (torch.randn(2, 4),)), path)
    with pytest.raises(InvalidModel, match=r"control flow \(torch\.ops\.higher_order\.cond"):
        load_model(path, ModelSpec())


def test_every_pipeline_option_works_on_a_rebuilt_graph_with_the_upload_s_names(tiny_cnn, tmp_path: Path) -> None:
    """A second-order criterion, per-layer scope, two steps with fine-tuning between them,
    ``exclude`` by the name the export recorded, and dynamic INT8 of the rebuilt Linear head."""
    from compactor.spec import JobSpec
    from tests.support.jobs import write_digits_dataset
    from worker.compression.pipeline import BenchmarkOptions, compress_files

    spec = JobSpec.model_validate(
        {
            "model": {"input_shape": [1, 1, 8, 8]},
            "prune": {"granularity": "channel", "amount": 0.5, "criterion": "hessian", "scope": "layer", "steps": 2, "exclude": ["features.3"]},
            "finetune": {"epochs": 2},
            "quantize": {"mode": "dynamic"},
        }
    )
    dataset = write_digits_dataset(tmp_path / "digits.pt")
    archive = _export(tiny_cnn, tmp_path / "tiny.pt2", torch.randn(2, 1, 8, 8))
    metrics = compress_files(archive, spec, tmp_path / "out", dataset_path=dataset, benchmark=BenchmarkOptions(warmup=1, runs=2)).metrics
    layers = {row["name"]: row for row in metrics["layers"]}
    assert layers["features.3"]["channels_after"] == layers["features.3"]["channels_before"] == 64  # excluded
    assert layers["features.0"]["channels_after"] < 32 and layers["features.7"]["channels_after"] < 128
    assert metrics["prune"]["criterion"] == "hessian" and metrics["quantization"]["mode"] == "dynamic"
    assert metrics["compressed"]["accuracy"]["top1"] > 0.8
    assert metrics["environment"]["structure"] == {"graph": "torch.export", "layers_rebuilt": 7, "calls_left": []}
