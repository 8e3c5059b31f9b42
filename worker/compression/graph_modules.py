"""Real layer modules back into an exported graph, so the nn.Module tools can see its layers.

``ExportedProgram.module()`` computes with ``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm``
calls on parameters (``get_attr`` nodes); it has no ``nn.Conv2d``, ``nn.Linear`` or
``nn.BatchNorm2d``. Torch-Pruning's dependency graph, ``prunable_layers``, eager INT8 and FX
quantization all look for those modules. ``rebuild_layer_modules`` replaces each such call whose
weights are the program's own parameters by a ``call_module`` of a real module that holds the
very same ``Parameter`` objects and buffers, installed at the name the export recorded
(``features.0``), so ``exclude`` patterns and the report's layer table keep the original names.
Nothing is copied or recomputed: outputs stay bit-identical (``tests/compression/test_graph_modules.py``).

Mapped: ``aten.conv{1,2,3}d`` and ``aten.convolution`` (transposed too, as tracing records it),
``aten.linear``, ``aten.batch_norm``, ``aten.layer_norm`` and ``aten.group_norm``. Calls it
cannot map exactly (a weight computed in the graph, an unknown keyword, string padding) stay as
they are; their layers are then simply not prunable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_CONVOLUTION = torch.ops.aten.convolution.default
_CONV_ND = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}
# (input, weight, bias, stride, padding, output_padding, groups, dilation): another order than conv's.
_CONV_TRANSPOSE_ND = {
    torch.ops.aten.conv_transpose1d.default: 1,
    torch.ops.aten.conv_transpose2d.input: 2,
    torch.ops.aten.conv_transpose3d.input: 3,
}
_LINEAR = torch.ops.aten.linear.default
_BATCH_NORM = torch.ops.aten.batch_norm.default
_LAYER_NORM = torch.ops.aten.layer_norm.default
_GROUP_NORM = torch.ops.aten.group_norm.default
_REBUILT_KEY = "compactor.rebuilt_layers"
_CONV_TYPES: dict[tuple[int, bool], type[nn.modules.conv._ConvNd]] = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}


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
    # A converted TorchScript program may hold a weight as a buffer: it becomes a parameter of
    # the rebuilt layer (same storage), which is what a layer's weight is.
    tensor = getattr(graph_module.get_submodule(path) if path else graph_module, name, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    return path, tensor


def _install(graph_module: fx.GraphModule, path: str, layer: nn.Module) -> bool:
    if not path:
        return False
    parent_path, _, name = path.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    existing = getattr(parent, name, None)
    if not isinstance(existing, nn.Module) or any(True for _ in existing.children()):
        return False  # a real module with children is not a bare parameter holder
    owned = {name for name, _ in layer.named_parameters(recurse=False)} | {name for name, _ in layer.named_buffers(recurse=False)}
    for key, value in existing.__dict__.get("_buffers", {}).items():
        if key not in owned and value is not None:
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
    """``aten.conv{1,2,3}d`` and ``aten.conv_transpose{1,2,3}d`` (what torch.export and scripting
    record) and ``aten.convolution`` (what tracing records, transposed or not) as the nn.Conv*/ConvTranspose* that makes the same call."""
    found = _weight_and_bias(graph_module, node)
    if isinstance(found, str):
        return found
    path, w, bias = found
    if node.target == _CONVOLUTION:
        stride, padding, dilation, transposed, output_padding, groups = (list(node.args[3:9]) + [None] * 6)[:6]
    elif node.target in _CONV_TRANSPOSE_ND:
        stride, padding, output_padding, groups, dilation = (list(node.args[3:8]) + [None] * 5)[:5]
        transposed = True
    else:
        stride, padding, dilation, groups = (list(node.args[3:7]) + [None] * 4)[:4]
        transposed, output_padding = False, None
    dims = w.dim() - 2
    kind = _CONV_TYPES.get((dims, bool(transposed)))
    if kind is None or isinstance(padding, str):
        return "a form this rebuild does not map exactly (string padding, or not 1-, 2- or 3-d)"
    groups = int(groups) if groups is not None else 1
    # Transposed weights are [in, out/groups, *kernel]; the others [out, in/groups, *kernel].
    in_channels, out_channels = (w.shape[0], w.shape[1] * groups) if transposed else (w.shape[1] * groups, w.shape[0])
    options: dict[str, object] = {
        "stride": tuple(stride) if stride is not None else 1,
        "padding": tuple(padding) if padding is not None else 0,
        "dilation": tuple(dilation) if dilation is not None else 1,
    }
    if transposed:
        options["output_padding"] = tuple(output_padding) if output_padding is not None else 0
    layer = kind(in_channels, out_channels, tuple(w.shape[2:]), groups=groups, bias=bias is not None, device="meta", **options)  # type: ignore[arg-type]
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


def _affine_norm(graph_module: fx.GraphModule, node: fx.Node, weight_at: int) -> tuple[str, torch.Tensor, torch.Tensor] | str:
    weight = _owner(graph_module, node.args[weight_at] if len(node.args) > weight_at else None, "weight")
    bias = _owner(graph_module, node.args[weight_at + 1] if len(node.args) > weight_at + 1 else None, "bias")
    if node.kwargs or weight is None or bias is None or weight[0] != bias[0]:
        return "its scale and shift are not one layer's own parameters"
    return weight[0], weight[1], bias[1]


def _layer_norm(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | str:
    return _norm(graph_module, node, lambda weight: nn.LayerNorm(list(node.args[1]), eps=_eps(node), device="meta"))  # type: ignore[arg-type]


def _group_norm(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | str:
    return _norm(graph_module, node, lambda weight: nn.GroupNorm(int(node.args[1]), weight.shape[0], eps=_eps(node), device="meta"))  # type: ignore[arg-type]


def _eps(node: fx.Node) -> float:
    return float(node.args[4]) if len(node.args) > 4 else 1e-5  # type: ignore[arg-type]


def _norm(graph_module: fx.GraphModule, node: fx.Node, build: Callable[[torch.Tensor], nn.Module]) -> tuple[str, nn.Module] | str:
    """layer_norm(input, shape, weight, bias, eps, ...) and group_norm(input, groups, weight, bias, eps, ...)."""
    found = _affine_norm(graph_module, node, 2)
    if isinstance(found, str):
        return found
    path, weight, bias = found
    layer = build(weight)
    _adopt(layer, weight, bias)
    return path, layer


_BUILDERS = {
    _CONVOLUTION: _conv,
    **dict.fromkeys(_CONV_ND, _conv),
    **dict.fromkeys(_CONV_TRANSPOSE_ND, _conv),
    _LINEAR: _linear,
    _BATCH_NORM: _batch_norm,
    _LAYER_NORM: _layer_norm,
    _GROUP_NORM: _group_norm,
}


# ATen calls as the Python functions FX quantization knows: its fusion and quantized-op patterns
# (conv+bn+relu, add+relu, cat, pooling) match F.relu and torch.add, not
# aten.relu.default, which it would wrap in a dequantize/quantize pair each (resnet18 INT8: 18
# pairs, 0.89x at batch 1, against 3.7x once matched). Same positional arguments, same kernels.
_PUBLIC_FUNCTIONS: dict[object, Callable[..., object]] = {
    torch.ops.aten.relu.default: nn.functional.relu,
    torch.ops.aten.add.Tensor: torch.add,
    torch.ops.aten.mul.Tensor: torch.mul,
    torch.ops.aten.cat.default: torch.cat,
    torch.ops.aten.flatten.using_ints: torch.flatten,
    torch.ops.aten.mean.dim: torch.mean,
    torch.ops.aten.sigmoid.default: torch.sigmoid,
    torch.ops.aten.hardtanh.default: nn.functional.hardtanh,
    torch.ops.aten.hardswish.default: nn.functional.hardswish,
    torch.ops.aten.hardsigmoid.default: nn.functional.hardsigmoid,
    torch.ops.aten.silu.default: nn.functional.silu,
    torch.ops.aten.max_pool2d.default: nn.functional.max_pool2d,
    torch.ops.aten.avg_pool2d.default: nn.functional.avg_pool2d,
    torch.ops.aten.adaptive_avg_pool2d.default: nn.functional.adaptive_avg_pool2d,
}
# torch.export keeps a module's in-place ops (ResNet's relu_ and add_). Out of place they compute
# the same wherever nothing else reads the tensor they would overwrite.
_IN_PLACE: dict[object, Callable[..., object]] = {
    torch.ops.aten.relu_.default: nn.functional.relu,
    torch.ops.aten.add_.Tensor: torch.add,
    torch.ops.aten.mul_.Tensor: torch.mul,
    torch.ops.aten.sigmoid_.default: torch.sigmoid,
    torch.ops.aten.hardtanh_.default: nn.functional.hardtanh,
    torch.ops.aten.hardswish_.default: nn.functional.hardswish,
    torch.ops.aten.hardsigmoid_.default: nn.functional.hardsigmoid,
    torch.ops.aten.silu_.default: nn.functional.silu,
}


def _public_calls(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op != "call_function" or (node.kwargs and node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)):
            continue
        public = _PUBLIC_FUNCTIONS.get(node.target)
        if public is None and node.target in _IN_PLACE:
            overwritten = node.args[0] if node.args else None
            if isinstance(overwritten, fx.Node) and len(overwritten.users) == 1 and overwritten.op != "placeholder":
                public = _IN_PLACE[node.target]
        if public is not None:
            node.target = public


def rebuild_layer_modules(graph_module: fx.GraphModule) -> Rebuilt:
    """Every mappable convolution / linear / norm call replaced by its real module (the graph is
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
    _public_calls(graph)
    # get_attr nodes of parameters the modules now own are dead; the graph must not keep them.
    graph.eliminate_dead_code()
    graph.lint()
    # A plain GraphModule over the same submodules and graph: the one ExportedProgram.module()
    # returns refuses train()/eval(), which fine-tuning and every evaluation call.
    result.module = fx.GraphModule(graph_module, graph).eval()
    fold_static_shapes(result.module)
    # Travels with the module (GraphModule copies keep ``meta``) so the report can say what was rebuilt.
    result.module.meta[_REBUILT_KEY] = {"layers_rebuilt": len(result.layers), "calls_left": [f"{name}: {why}" for name, why in result.left]}
    return result


def rebuilt_layers(module: object) -> dict[str, object] | None:
    """What ``rebuild_layer_modules`` did to ``module`` (layers rebuilt, calls left and why), or None
    for a module it did not make."""
    meta = getattr(module, "meta", None) if isinstance(module, fx.GraphModule) else None
    found = meta.get(_REBUILT_KEY) if isinstance(meta, dict) else None
    return dict(found) if isinstance(found, dict) else None


def control_flow(graph_module: fx.GraphModule) -> list[str]:
    """The higher-order ops (``torch.cond``, ``while_loop``, ``map``) a graph calls, as ``name (node)``.

    A graph that has them computes correctly, but neither TorchScript tracing nor scripting can
    compile it, so it cannot become ``model.ts``."""
    found = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            found.append(f"torch.ops.higher_order.{node.target.__name__} ({node.name})")
    return found


# Shape queries whose answer torch.export recorded as a plain number (not a SymInt) are constants.
_SHAPE_QUERIES = {torch.ops.aten.sym_size.int, torch.ops.aten.dim.default, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}
_ASSERT_SCALAR = torch.ops.aten._assert_scalar.default
_MAX_FOLDED_ELEMENTS = 64
_SIZED_METHODS = {torch.ops.aten.reshape.default: "reshape", torch.ops.aten.view.default: "view", torch.ops.aten.expand.default: "expand"}


def _seeded(target: object) -> bool:
    """Random ops (``randn``, ``dropout``): evaluating them once would freeze one draw."""
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def fold_static_shapes(graph_module: fx.GraphModule) -> int:
    """Evaluate once what only depends on static sizes, and read the batch size so that
    TorchScript tracing keeps it dynamic; returns how many nodes were folded.

    A traced TorchScript program computes with the sizes it saw as tensors (``scalar_tensor``,
    ``floor_divide``, ``.item()``): an attention block's ``(channels // heads) ** -0.5``, for
    instance. After conversion those are graph nodes that TorchScript export cannot trace again;
    their values are known (the channel count is not the batch), so they become constants, as
    torch.export itself records them for an ``nn.Module``. Anything touching a dynamic size stays.
    """
    graph = graph_module.graph
    values: dict[fx.Node, object] = {}
    dynamic_sizes: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(node.target, str):
            # Lifted constants (a traced program's `heads` as a tensor), never a layer's weights.
            held = getattr(graph_module, node.target, None) if "." not in node.target else None
            if isinstance(held, torch.Tensor) and not isinstance(held, nn.Parameter) and held.numel() <= _MAX_FOLDED_ELEMENTS:
                values[node] = held
            continue
        if node.op != "call_function" or node.target is _ASSERT_SCALAR:
            continue
        if node.target in _SHAPE_QUERIES:
            known = node.meta.get("val")
            if isinstance(known, (int, bool)):
                values[node] = known
            elif node.target is torch.ops.aten.sym_size.int:
                dynamic_sizes.append(node)
            continue
        if any(arg not in values for arg in node.all_input_nodes) or _seeded(node.target):
            continue
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda arg: values[arg])  # type: ignore[index]
        try:
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - not foldable here: it stays in the graph
            continue
    folded = 0
    for node, value in values.items():
        outside = [user for user in node.users if user not in values]
        if not outside:
            continue
        if isinstance(value, torch.Tensor):
            name = f"_folded_{node.name}"
            graph_module.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            node.replace_all_uses_with(constant, delete_user_cb=lambda user: user not in values)
        elif isinstance(value, (int, float, bool)):
            for user in outside:
                user.args, user.kwargs = fx.map_arg((user.args, user.kwargs), lambda arg, n=node, v=value: v if arg is n else arg)  # type: ignore[misc]
        else:
            continue
        folded += 1
    # torch.export's runtime checks of its own shape assumptions: TorchScript tracing hands them
    # tensors where they take numbers, and a shape that breaks an assumption fails in the op anyway.
    for node in list(graph.nodes):
        if node.target is _ASSERT_SCALAR:
            graph.erase_node(node)
    # The batch size read as `x.size(0)`, not `aten.sym_size`: TorchScript's tracer records the
    # former as a computation, the latter as the number it saw (a model.ts fixed to one batch size).
    # Likewise the ops that take such sizes go through the Tensor method (`t.reshape(n, ...)`),
    # which the tracer records with the size as a value, not through the op, which reads a number.
    for node in dynamic_sizes:
        with graph.inserting_before(node):
            size = graph.call_method("size", node.args, node.kwargs)
        size.meta = dict(node.meta)
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    for node in list(graph.nodes):
        method = _SIZED_METHODS.get(node.target) if node.op == "call_function" else None
        if method is None or node.kwargs or len(node.args) != 2 or not any(isinstance(arg, fx.Node) for arg in node.args[1]):  # type: ignore[union-attr]
            continue
        with graph.inserting_before(node):
            call = graph.call_method(method, (node.args[0], *node.args[1]))  # type: ignore[misc]
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return folded
