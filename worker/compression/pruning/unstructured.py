"""Element-wise (unstructured) pruning: keep-masks from scores, and keeping the zeros zero.

Sparsity does not shrink dense kernels or the serialized file; the report says so.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from compactor.errors import CompressionFailed, InvalidSpec

Scope = Literal["global", "layer"]


def _check_amount(amount: float) -> None:
    if not 0.0 <= amount < 1.0:
        raise InvalidSpec(f"prune.amount must be in [0, 1), got {amount}", field="prune.amount")


def _check_scope(scope: str) -> None:
    if scope not in ("global", "layer"):
        raise InvalidSpec(f"prune.scope must be 'global' or 'layer', got {scope!r}", field="prune.scope")


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` smallest entries of a 1-D tensor.

    Ties at the threshold are broken by position, so equal scores (a criterion
    that gives many zeros) never push the count past ``k``. Uses kthvalue rather
    than a full argsort, which would need 8 bytes per weight.
    """
    selected = torch.zeros_like(values, dtype=torch.bool)
    if k <= 0:
        return selected
    if k >= values.numel():
        return ~selected
    threshold = torch.kthvalue(values, k).values
    selected = values < threshold
    missing = k - int(selected.sum())
    if missing > 0:
        ties = torch.nonzero(values == threshold, as_tuple=True)[0][:missing]
        selected[ties] = True
    return selected


def _resolve_weights(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    parameters = dict(model.named_parameters())
    weights: dict[str, nn.Parameter] = {}
    for layer_name in layers:
        name = f"{layer_name}.weight" if layer_name else "weight"
        if name not in parameters:
            raise CompressionFailed(f"layer {layer_name!r} has no weight parameter in this model")
        weights[name] = parameters[name]
    return weights


def _layer_scores(
    weights: dict[str, nn.Parameter],
    scores: dict[str, torch.Tensor],
    previous_masks: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Flat float32 CPU scores per weight, with already-pruned entries forced lowest."""
    flat: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        if name not in scores:
            raise CompressionFailed(f"the criterion returned no score for {name}")
        score = scores[name]
        if score.shape != weight.shape:
            raise CompressionFailed(f"score for {name} has shape {tuple(score.shape)}, the weight {tuple(weight.shape)}")
        score = score.detach().to(device="cpu", dtype=torch.float32).flatten().clone()
        if not torch.isfinite(score).all():
            raise CompressionFailed(f"the criterion produced non-finite scores for {name}")
        if name in previous_masks:
            # An earlier step's zeros stay pruned and count toward the cumulative amount.
            score[~previous_masks[name].detach().to("cpu").flatten()] = float("-inf")
        flat[name] = score
    return flat


def prune_unstructured(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    amount: float,
    scope: Scope,
    layers: dict[str, nn.Module],
    previous_masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero the lowest-scored weights of ``layers`` in place; return keep-masks by parameter name.

    ``amount`` is the cumulative fraction of the layers' weights that are zero
    afterwards: ``global`` draws one threshold over all layers' scores, ``layer``
    removes the same fraction from each layer. With ``previous_masks`` (iterative
    pruning) everything pruned before stays pruned; a layer already past the
    target keeps its zeros. Masks are bool tensors on each weight's device.
    Works for nn.Module and TorchScript modules alike.
    """
    _check_amount(amount)
    _check_scope(scope)
    if not layers:
        raise InvalidSpec("nothing to prune: every Conv/Linear layer is excluded", field="prune.exclude")
    previous = previous_masks or {}
    weights = _resolve_weights(model, layers)
    flat = _layer_scores(weights, scores, previous)

    pruned: dict[str, torch.Tensor] = {}
    if scope == "global":
        total = sum(score.numel() for score in flat.values())
        already = sum(int(torch.isneginf(score).sum()) for score in flat.values())
        selected = lowest_k(torch.cat(list(flat.values())), max(round(amount * total), already))
        offset = 0
        for name, score in flat.items():
            pruned[name] = selected[offset : offset + score.numel()]
            offset += score.numel()
    else:
        for name, score in flat.items():
            already = int(torch.isneginf(score).sum())
            pruned[name] = lowest_k(score, max(round(amount * score.numel()), already))

    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, weight in weights.items():
            keep = (~pruned[name]).reshape(weight.shape).to(weight.device)
            weight.masked_fill_(~keep, 0)
            masks[name] = keep
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights; call after every optimizer step so momentum cannot revive them."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            parameter = parameters.get(name)
            if parameter is None:
                raise CompressionFailed(f"mask for {name}, which this model does not have")
            if keep.device != parameter.device:
                keep = keep.to(parameter.device)
            parameter.masked_fill_(~keep, 0)


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out weights over all masked parameters."""
    total = sum(mask.numel() for mask in masks.values())
    if total == 0:
        return 0.0
    return 1.0 - sum(int(mask.sum()) for mask in masks.values()) / total
