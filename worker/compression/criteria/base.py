"""What every importance criterion is, and the gradient pass the data criteria share.

A criterion only scores: it returns, per named parameter, an element-wise
tensor of the parameter's shape (higher = more important, float32, on CPU).
How those scores become removed weights or channels is the pruner's business
(Torch-Pruning's Importance / pruner split).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compactor.catalogue import CRITERIA, CriterionFacts
from compactor.errors import CompressionFailed, InvalidDataset, InvalidSpec
from compactor.jobs import Stage
from worker.compression.context import BatchSource, RunContext, limited

SCORE_STAGE = Stage.score

# term(weight, gradient) -> the per-batch contribution a criterion accumulates.
GradientTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Criterion(abc.ABC):
    """Scores parameters element-wise; subclasses set ``name``, declared in ``compactor.catalogue``
    with its facts (``needs_data``), which are read from there, not restated here."""

    name: ClassVar[str]

    @classmethod
    def facts(cls) -> CriterionFacts:
        return CRITERIA[cls.name]

    @abc.abstractmethod
    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        """Return {parameter name: float32 CPU tensor of that parameter's shape}, higher = keep."""


class GradientTermCriterion(Criterion):
    """A criterion built from per-batch gradients: accumulate ``term(w, g)`` over the batches,
    then ``finish(total, batches_used, w)``. A new gradient criterion defines just those two
    (and is declared ``needs_data=True`` in the catalogue)."""

    @abc.abstractmethod
    def term(self, weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The per-batch, per-element quantity that is summed."""

    @abc.abstractmethod
    def finish(self, total: torch.Tensor, batches_used: int, weight: torch.Tensor) -> torch.Tensor:
        """The score from the summed terms."""

    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        sums, used = accumulate_gradient_terms(model, parameters, require_batches(self, batches), ctx, max_batches, self.term)
        return to_scores({name: self.finish(total, used, parameters[name].detach().float()) for name, total in sums.items()})


def require_batches(criterion: Criterion, batches: BatchSource | None) -> BatchSource:
    if batches is None:
        raise InvalidSpec(
            f"prune.criterion '{criterion.name}' needs data to score with: upload a dataset, or use 'magnitude' or 'random', which need none",
            field="prune.criterion",
        )
    return batches


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def logits_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    # torchvision's GoogLeNet/Inception outputs are namedtuples with the logits first.
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CompressionFailed(f"the model returned {type(output).__name__}; data-driven criteria need a tensor of class logits")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy on the targets, or on the model's own predictions when there are none.

    Without labels the argmax is taken from detached logits: the pseudo-labels
    carry no gradient, which is the same as computing them under no_grad, without
    a second forward pass.
    """
    if logits.dim() < 2:
        raise CompressionFailed(f"expected logits of shape [batch, classes, ...], got {tuple(logits.shape)}")
    if targets is None:
        targets = logits.detach().argmax(dim=1)
    else:
        targets = targets.to(logits.device)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InvalidDataset(f"targets must be integer class indices, got {targets.dtype}")
        num_classes = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise InvalidDataset(
                f"targets must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs; "
                f"found values in [{int(targets.min())}, {int(targets.max())}]"
            )
    return F.cross_entropy(logits, targets.long())


def accumulate_gradient_terms(
    model: nn.Module,
    parameters: dict[str, nn.Parameter],
    batches: BatchSource,
    ctx: RunContext,
    max_batches: int,
    term: GradientTerm,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum ``term(weight, dL/dweight)`` over up to ``max_batches`` batches.

    Returns (per-parameter sums on the model's device, float32; batches used).
    Each batch gets its own gradient, so criteria can combine per-batch gradients
    non-linearly (squares, absolute values) instead of only seeing their sum.

    The pass runs in eval mode so BatchNorm uses its running statistics and does
    not update them, and dropout does not add noise to the scores; the model's
    modes, its parameters' requires_grad and its (zeroed) grads are left as a
    caller expects.
    """
    if max_batches < 1:
        raise InvalidSpec("prune.score_batches must be at least 1", field="prune.score_batches")
    if not parameters:
        return {}, 0
    device = model_device(model)
    names = list(parameters)
    tensors = [parameters[name] for name in names]
    sums = {name: torch.zeros(parameters[name].shape, dtype=torch.float32, device=parameters[name].device) for name in names}
    modes = {module: module.training for module in model.modules()}
    requires_grad = [tensor.requires_grad for tensor in tensors]
    used = 0
    try:
        model.eval()
        for tensor in tensors:
            tensor.requires_grad_(True)
        with torch.enable_grad():
            for inputs, targets in limited(batches, max_batches):
                ctx.check_cancelled()
                loss = classification_loss(logits_of(model(inputs.to(device))), targets)
                # autograd.grad leaves .grad untouched, so nothing accumulates across batches by accident.
                gradients = torch.autograd.grad(loss, tensors, allow_unused=True)
                for name, tensor, gradient in zip(names, tensors, gradients, strict=True):
                    if gradient is not None:
                        sums[name] += term(tensor.detach().float(), gradient.float())
                used += 1
                ctx.report(SCORE_STAGE, used / max_batches)
    finally:
        for tensor, flag in zip(tensors, requires_grad, strict=True):
            tensor.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training
        model.zero_grad(set_to_none=True)
    if used == 0:
        raise InvalidDataset("the dataset yielded no batches to score with")
    ctx.report(SCORE_STAGE, 1.0)
    return sums, used


def to_scores(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to(device="cpu", dtype=torch.float32) for name, tensor in tensors.items()}
