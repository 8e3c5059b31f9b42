"""worker/compression/graph_modules.py: an exported graph gets its real layer modules back,
with outputs bit-identical and the export's names, so the nn.Module tools see its layers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tests.support.models import TinyCNN
from worker.compression.graph_modules import rebuild_layer_modules
from worker.compression.pruning import prunable_layers


def _exported(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    module: torch.fx.GraphModule = program.module()
    return module


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: TinyCNN(), (2, 1, 8, 8)),
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    ],
    ids=["tiny_cnn", "resnet18", "mobilenet_v2"],
)
def test_layers_come_back_with_their_names_and_identical_outputs(build, shape) -> None:
    torch.manual_seed(0)
    model = build().eval()
    graph_module = _exported(model, torch.randn(*shape))
    inputs = torch.randn(5, *shape[1:])
    with torch.no_grad():
        before = graph_module(inputs)
    rebuilt = rebuild_layer_modules(graph_module)
    with torch.no_grad():
        after = rebuilt.module(inputs)
    assert torch.equal(before, after)
    originals = {name: type(module).__name__ for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert rebuilt.layers == originals, rebuilt.left
    assert rebuilt.left == []
    # The parameters are the program's own objects, not copies: training the module trains them.
    assert {name for name, _ in rebuilt.module.named_parameters()} == {name for name, _ in model.named_parameters()}
    # What the pruning code looks for is there now, under the original names.
    layers = prunable_layers(rebuilt.module, [], channel_mode=False)
    assert set(layers) == {name for name, kind in originals.items() if kind != "BatchNorm2d"}


def test_a_weight_computed_in_the_graph_is_left_as_it_is() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.head.weight * 2, self.head.bias)

    graph_module = _exported(Scaled(), torch.randn(2, 4))
    x = torch.randn(3, 4)
    expected = graph_module(x)
    rebuilt = rebuild_layer_modules(graph_module)
    assert rebuilt.layers == {} and len(rebuilt.left) == 1
    assert torch.equal(rebuilt.module(x), expected)


def _prune_half(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from worker.compression.context import RunContext
    from worker.compression.criteria import get_criterion
    from worker.compression.pruning import prune_channels, scoring_parameters

    layers = prunable_layers(model, [], channel_mode=True, example_inputs=example)
    scores = get_criterion("magnitude").score(model, scoring_parameters(model, layers, channel_mode=True), None, RunContext(), 1)
    prune_channels(model, example, scores, 0.5, "global", [], RunContext())
    return model


class FlattenHead(nn.Module):
    """A head whose Linear.in_features depends on the pruned channels through flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.flatten(x, 1))


@pytest.mark.parametrize(
    "build",
    [lambda: torchvision.models.resnet18(num_classes=10), lambda: torchvision.models.mobilenet_v2(num_classes=10), FlattenHead],
    ids=["resnet18", "mobilenet_v2", "flatten_head"],
)
def test_channel_pruning_of_the_rebuilt_graph_matches_the_module_path(build) -> None:
    """Torch-Pruning's dependency graph sees the rebuilt layers: 50% channels give the same
    MACs as pruning the nn.Module itself, and the pruned graph still takes any batch size."""
    import copy

    from worker.compression import measure

    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, 3, 32, 32)
    macs = measure.count_macs(model, example)
    by_module = measure.count_macs(_prune_half(copy.deepcopy(model), example), example) / macs
    graph = rebuild_layer_modules(_exported(model, torch.randn(2, 3, 32, 32))).module
    pruned = _prune_half(graph, example)
    assert measure.count_macs(pruned, example) / macs == pytest.approx(by_module, abs=0.02)
    assert by_module < 0.4
    assert pruned(torch.randn(7, 3, 32, 32)).shape == (7, 10)


class EveryLayerKind(nn.Module):
    """One of each layer the rebuild maps beyond conv2d/linear/batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, output_padding=0)
        self.line = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.group_norm(self.conv(x))))  # [N, 4, 16, 16]
        x = self.line(x.flatten(2))  # [N, 6, 256]
        return self.head(self.norm(x.transpose(1, 2)).mean(dim=1))


@pytest.mark.parametrize("door", ["export", "traced", "scripted"])
def test_transposed_1d_and_normalisation_layers_come_back_too(door: str) -> None:
    from worker.compression.graph_convert import GraphConversionFailed, torchscript_to_graph

    torch.manual_seed(0)
    model = EveryLayerKind().eval()
    example = torch.randn(2, 3, 8, 8)
    if door == "export":
        rebuilt = rebuild_layer_modules(_exported(model, example))
        module, layers, left = rebuilt.module, rebuilt.layers, rebuilt.left
    elif door == "scripted":
        # Scripted ConvTranspose computes its output padding in a loop the converter cannot
        # express (a known limit, in the README): it fails naming the construct; tracing works.
        with pytest.raises(GraphConversionFailed, match="prim::Loop"):
            torchscript_to_graph(torch.jit.script(model), example)
        return
    else:
        converted = torchscript_to_graph(torch.jit.trace(model, example), example)
        module, layers, left = converted.module, converted.rebuilt.layers, converted.rebuilt.left
    expected = {name: type(layer).__name__ for name, layer in model.named_children()}
    assert layers == expected and left == []
    inputs = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(inputs), model(inputs), atol=1e-6, rtol=0)
