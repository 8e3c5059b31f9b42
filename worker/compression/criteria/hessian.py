"""Second-order (Optimal Brain Damage) saliency ½·F·w².

The Hessian diagonal is approximated by the diagonal empirical Fisher
F = mean over batches of g², which needs only gradients (no second backward).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria.base import Criterion, accumulate_gradient_terms, require_batches, to_scores


def _squared_gradient(weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    return gradient.square()


class HessianCriterion(Criterion):
    name = "hessian"
    needs_data = True

    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        sums, used = accumulate_gradient_terms(
            model, parameters, require_batches(self, batches), ctx, max_batches, _squared_gradient
        )
        return to_scores(
            {name: 0.5 * (total / used) * parameters[name].detach().float().square() for name, total in sums.items()}
        )
