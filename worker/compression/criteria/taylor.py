"""First-order Taylor: |w·∂L/∂w|, the estimated loss change from removing w, averaged over batches.

The absolute value is taken per batch before averaging, so gradients of
opposite sign in different batches do not cancel into a falsely low score.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria.base import Criterion, accumulate_gradient_terms, require_batches, to_scores


def _first_order_term(weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    return (weight * gradient).abs()


class TaylorCriterion(Criterion):
    name = "taylor"
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
            model, parameters, require_batches(self, batches), ctx, max_batches, _first_order_term
        )
        return to_scores({name: total / used for name, total in sums.items()})
