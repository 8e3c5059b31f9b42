"""Pruning: turns a criterion's scores into removed weights (unstructured) or channels (structured).

layers = prunable_layers(model, spec.exclude, channel_mode=False)
masks = prune_unstructured(model, scores, 0.5, "global", layers)
... after every optimizer step: apply_masks(model, masks)

report = prune_channels(model, example_inputs, scores, 0.5, "global", spec.exclude, ctx)
recalibrate_batchnorm(model, train_batches, ctx)
"""

from worker.compression.pruning.batchnorm import recalibrate_batchnorm
from worker.compression.pruning.channel import (
    MAX_LAYER_PRUNING_RATIO,
    ChannelPruneReport,
    ElementScoreImportance,
    LayerChannels,
    prune_channels,
)
from worker.compression.pruning.layers import find_head, prunable_layers, scoring_parameters
from worker.compression.pruning.unstructured import apply_masks, prune_unstructured, sparsity

__all__ = [
    "MAX_LAYER_PRUNING_RATIO",
    "ChannelPruneReport",
    "ElementScoreImportance",
    "LayerChannels",
    "apply_masks",
    "find_head",
    "prunable_layers",
    "prune_channels",
    "prune_unstructured",
    "recalibrate_batchnorm",
    "scoring_parameters",
    "sparsity",
]
