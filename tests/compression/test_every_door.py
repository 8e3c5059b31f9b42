"""A torchvision model through every door ends with the same structure after the same spec:
uploaded as a state_dict with model.arch, as a torch.export archive, and as traced and scripted
TorchScript, 50% channel pruning gives MACs ratios equal within 0.02."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from compactor.spec import JobSpec
from tests.support.doors import DOORS, write_upload
from worker.compression.loading import load_model
from worker.compression.pipeline import BenchmarkOptions, compress

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

QUICK = BenchmarkOptions(warmup=1, runs=2, batch_sizes=(1,))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_the_same_model_through_every_door_prunes_to_the_same_structure(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    spec = JobSpec.model_validate(
        {
            "model": {"input_shape": [1, 3, 32, 32], "arch": arch, "arch_kwargs": {"num_classes": 10}},
            "prune": {"granularity": "channel", "amount": 0.5},
        }
    )
    ratios: dict[str, float] = {}
    for door in DOORS:
        directory = tmp_path / door
        directory.mkdir()
        loaded = load_model(write_upload(model, door, directory, torch.randn(2, 3, 32, 32)), spec.model, trusted_code=True)
        metrics = compress(loaded, spec, out_dir=directory / "out", benchmark=QUICK).metrics
        ratios[door] = metrics["ratios"]["macs"]
        assert metrics["environment"]["model_format"] == ("torchscript" if door in ("traced", "scripted") else door)
    assert ratios["state_dict"] < 0.5
    for ratio in ratios.values():
        assert ratio == pytest.approx(ratios["state_dict"], abs=0.02), ratios


def test_int8_of_a_graph_upload_fuses_like_the_module(tmp_path: Path) -> None:
    """FX quantization must see the graph's relu/add as the functions its fusion patterns know:
    the same quantized ops through the .pt2 door as through the module (it used to wrap every
    ReLU of resnet18 in a dequantize/quantize pair: 0.89x at batch 1)."""
    import collections

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 32, 32]}, "quantize": {"mode": "static"}})
    kinds = {}
    for door in ("state_dict", "pt2"):
        directory = tmp_path / door
        directory.mkdir()
        loaded = load_model(
            write_upload(model, door, directory, torch.randn(2, 3, 32, 32)),
            spec.model.model_copy(update={"arch": "resnet18", "arch_kwargs": {"num_classes": 10}}),
        )
        compiled = compress(loaded, spec, benchmark=QUICK).torchscript
        kinds[door] = collections.Counter(
            node.kind() for node in compiled.graph.nodes() if "quant" in node.kind() or node.kind().startswith("aten::relu")
        )
    assert kinds["pt2"] == kinds["state_dict"], kinds
    assert kinds["pt2"]["aten::quantize_per_tensor"] == 1
