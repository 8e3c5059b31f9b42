"""‖∂L/∂w‖ over data: sqrt of the sum of squared per-batch gradients."""

from __future__ import annotations

import torch
from torch import nn

from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria.base import Criterion, accumulate_gradient_terms, require_batches, to_scores


def _squared_gradient(weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    return gradient.square()


class GradientCriterion(Criterion):
    name = "gradient"
    needs_data = True

    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        sums, _ = accumulate_gradient_terms(
            model, parameters, require_batches(self, batches), ctx, max_batches, _squared_gradient
        )
        return to_scores({name: total.sqrt() for name, total in sums.items()})
