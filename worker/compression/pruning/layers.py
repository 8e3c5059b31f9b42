"""Which modules are pruned, which one is the classifier head, and which parameters get scored."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

# Recognised by class name as well, because TorchScript modules (which may be
# pruned unstructured) are RecursiveScriptModule instances that only remember
# the name of the class they were compiled from.
_WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
_WEIGHTED_LAYER_NAMES = frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_weighted_layer(module: nn.Module) -> bool:
    """A Conv or Linear, eager or TorchScript, that owns a weight tensor."""
    if isinstance(module, _WEIGHTED_LAYER_TYPES):
        return True
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None) in _WEIGHTED_LAYER_NAMES and _own_weight(module) is not None
    return False


def _own_weight(module: nn.Module) -> torch.Tensor | None:
    for name, parameter in module.named_parameters(recurse=False):
        if name == "weight":
            return parameter
    return None


def is_excluded(name: str, exclude: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in exclude)


def find_head(model: nn.Module, example_inputs: torch.Tensor | None = None) -> str | None:
    """Qualified name of the Conv/Linear whose outputs are the model's logits.

    With example inputs, one traced forward pass decides: the layer whose output
    tensor is returned, else the last Conv/Linear that ran (a head followed by
    flatten, as in SqueezeNet). Without inputs, the last Conv/Linear in
    registration order, which is the head of every torchvision classifier.
    """
    layers = [(name, module) for name, module in model.named_modules() if is_weighted_layer(module)]
    if not layers:
        return None
    if example_inputs is None or isinstance(model, torch.jit.ScriptModule):
        return layers[-1][0]

    executed: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                executed.append((name, output))

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in layers]
    modes = {module: module.training for module in model.modules()}
    device = next(iter(model.parameters())).device
    try:
        model.eval()
        with torch.no_grad():
            output = model(example_inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not executed:
        return layers[-1][0]
    logits = output[0] if isinstance(output, (tuple, list)) and output else output
    for name, produced in reversed(executed):
        if produced is logits:
            return name
    return executed[-1][0]


def prunable_layers(
    model: nn.Module,
    exclude: list[str],
    *,
    channel_mode: bool,
    example_inputs: torch.Tensor | None = None,
) -> dict[str, nn.Module]:
    """Conv/Linear modules by qualified name, minus those matching an fnmatch pattern in ``exclude``.

    In channel mode the classifier head is left out too: removing its outputs
    would remove classes. ``example_inputs`` lets the head be found by tracing
    (see ``find_head``).
    """
    head = find_head(model, example_inputs) if channel_mode else None
    return {name: module for name, module in model.named_modules() if is_weighted_layer(module) and name != head and not is_excluded(name, exclude)}


def scoring_parameters(model: nn.Module, layers: dict[str, nn.Module], *, channel_mode: bool) -> dict[str, nn.Parameter]:
    """The parameters a criterion must score before pruning ``layers``.

    Unstructured pruning only needs the pruned weights. Channel pruning ranks a
    channel by every weight removed with it (the next layer's inputs, the
    BatchNorm scale, the head's inputs), so it needs every Conv/Linear/norm
    weight in the model.
    """
    if not channel_mode:
        found: dict[str, nn.Parameter] = {}
        for name, module in layers.items():
            weight = _own_weight(module)
            if weight is not None:
                found[f"{name}.weight" if name else "weight"] = weight
        return found
    return {
        f"{name}.weight" if name else "weight": module.weight
        for name, module in model.named_modules()
        if (isinstance(module, (_WEIGHTED_LAYER_TYPES, _NORM_TYPES))) and isinstance(getattr(module, "weight", None), nn.Parameter)
    }


def out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    raise TypeError(f"{type(module).__name__} has no output channels")
