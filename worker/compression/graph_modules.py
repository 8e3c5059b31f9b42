"""Real layer modules back into an exported graph, so the nn.Module tools can see its layers.

``ExportedProgram.module()`` computes with ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm``
calls on parameters (``get_attr`` nodes); it has no ``nn.Conv2d``, ``nn.Linear`` or
``nn.BatchNorm2d``. Torch-Pruning's dependency graph, ``prunable_layers``, eager INT8 and FX
quantization all look for those modules. ``rebuild_layer_modules`` replaces each such call whose
weights are the program's own parameters by a ``call_module`` of a real module that holds the
very same ``Parameter`` objects and buffers, installed at the name the export recorded
(``features.0``), so ``exclude`` patterns and the report's layer table keep the original names.
Nothing is copied or recomputed: outputs stay bit-identical (``tests/compression/test_graph_modules.py``).

Calls it cannot map exactly (a weight computed in the graph, an unknown keyword, a transposed or
3-d convolution for now) stay as they are; their layers are then simply not prunable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

_CONV = torch.ops.aten.conv2d.default
_LINEAR = torch.ops.aten.linear.default
_BATCH_NORM = torch.ops.aten.batch_norm.default


@dataclass
class Rebuilt:
    module: fx.GraphModule
    # Original name → the layer type installed there; and the calls left as they were, with why.
    layers: dict[str, str] = field(default_factory=dict)
    left: list[tuple[str, str]] = field(default_factory=list)


def _owner(graph_module: fx.GraphModule, node: fx.Node | None, leaf: str) -> tuple[str, nn.Parameter | torch.Tensor] | None:
    """(owning module path, tensor) when ``node`` reads ``<path>.<leaf>`` of the graph module."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or not isinstance(node.target, str):
        return None
    path, _, name = node.target.rpartition(".")
    if name != leaf:
        return None
    tensor = graph_module.get_parameter(node.target) if leaf in ("weight", "bias") else graph_module.get_buffer(node.target)
    return path, tensor


def _install(graph_module: fx.GraphModule, path: str, layer: nn.Module) -> bool:
    if not path:
        return False
    parent_path, _, name = path.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    existing = getattr(parent, name, None)
    if not isinstance(existing, nn.Module) or any(True for _ in existing.children()):
        return False  # a real module with children is not a bare parameter holder
    for key, value in existing.__dict__.get("_buffers", {}).items():
        if key not in dict(layer.named_buffers(recurse=False)) and value is not None:
            layer.register_buffer(key, value)
    setattr(parent, name, layer)
    return True


def _weight_and_bias(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, torch.Tensor, torch.Tensor | None] | str:
    """(owning path, weight, bias or None) of a conv/linear call on one layer's own parameters."""
    weight = _owner(graph_module, node.args[1] if len(node.args) > 1 else None, "weight")
    if weight is None or node.kwargs:
        return "its weight is not a parameter of the program (or it is called with keywords)"
    path, w = weight
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _owner(graph_module, bias_node, "bias") if bias_node is not None else None
    if bias_node is not None and (bias is None or bias[0] != path):
        return "its bias is not its own parameter"
    return path, w, bias[1] if bias is not None else None


def _adopt(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The program's own Parameter objects, not copies: training the module trains them."""
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)


def _conv(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | str:
    found = _weight_and_bias(graph_module, node)
    if isinstance(found, str):
        return found
    path, w, bias = found
    stride, padding, dilation, groups = (list(node.args[3:7]) + [None] * 4)[:4]
    if w.dim() != 4 or isinstance(padding, str):
        return "a form this rebuild does not map exactly (string padding or not 2-d)"
    out_channels, in_per_group, kh, kw = w.shape
    groups = int(groups) if groups is not None else 1
    layer = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        (kh, kw),
        stride=tuple(stride) if stride is not None else 1,
        padding=tuple(padding) if padding is not None else 0,
        dilation=tuple(dilation) if dilation is not None else 1,
        groups=groups,
        bias=bias is not None,
        device="meta",
    )
    _adopt(layer, w, bias)
    return path, layer


def _linear(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | str:
    found = _weight_and_bias(graph_module, node)
    if isinstance(found, str):
        return found
    path, w, bias = found
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    _adopt(layer, w, bias)
    return path, layer


def _batch_norm(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | str:
    if node.kwargs or len(node.args) != 9:
        return "a form this rebuild does not map exactly"
    _input, weight_node, bias_node, mean_node, var_node, training, momentum, eps, _cudnn = node.args
    weight = _owner(graph_module, weight_node, "weight")
    bias = _owner(graph_module, bias_node, "bias")
    mean = _owner(graph_module, mean_node, "running_mean")
    var = _owner(graph_module, var_node, "running_var")
    if None in (weight, bias, mean, var) or len({part[0] for part in (weight, bias, mean, var) if part}) != 1 or training:
        return "its statistics or affine parameters are not one layer's own"
    assert weight is not None and bias is not None and mean is not None and var is not None
    value = _input.meta.get("val") if isinstance(_input, fx.Node) else None
    rank = value.dim() if isinstance(value, torch.Tensor) else None
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank or 0)
    if kind is None:
        return "the rank of its input is unknown"
    layer = kind(weight[1].shape[0], eps=float(eps), momentum=float(momentum), device="meta")  # type: ignore[arg-type]
    layer.weight = weight[1] if isinstance(weight[1], nn.Parameter) else nn.Parameter(weight[1])
    layer.bias = bias[1] if isinstance(bias[1], nn.Parameter) else nn.Parameter(bias[1])
    layer.running_mean = mean[1]
    layer.running_var = var[1]
    path = weight[0]
    tracked = f"{path}.num_batches_tracked"
    try:
        layer.num_batches_tracked = graph_module.get_buffer(tracked)
    except AttributeError:
        layer.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    return path, layer.eval()


_BUILDERS = {_CONV: _conv, _LINEAR: _linear, _BATCH_NORM: _batch_norm}


def rebuild_layer_modules(graph_module: fx.GraphModule) -> Rebuilt:
    """Every mappable conv2d / linear / batch_norm call replaced by its real module (the graph is
    edited in place; ``Rebuilt.module`` is a plain GraphModule over it, in eval mode)."""
    result = Rebuilt(module=graph_module)
    graph = graph_module.graph
    for node in list(graph.nodes):
        build = _BUILDERS.get(node.target) if node.op == "call_function" else None
        if build is None:
            continue
        built = build(graph_module, node)
        if isinstance(built, str):
            result.left.append((node.name, built))
            continue
        path, layer = built
        if path in result.layers or not _install(graph_module, path, layer):
            result.left.append((node.name, f"{path or 'the root'} is called more than once or is not a bare holder"))
            continue
        with graph.inserting_before(node):
            replacement = graph.call_module(path, (node.args[0],))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        result.layers[path] = type(layer).__name__
    # get_attr nodes of parameters the modules now own are dead; the graph must not keep them.
    graph.eliminate_dead_code()
    graph.lint()
    # A plain GraphModule over the same submodules and graph: the one ExportedProgram.module()
    # returns refuses train()/eval(), which fine-tuning and every evaluation call.
    result.module = fx.GraphModule(graph_module, graph).eval()
    return result
