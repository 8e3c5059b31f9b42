"""First-order Taylor: |w·∂L/∂w|, the estimated loss change from removing w, averaged over batches.

The absolute value is taken per batch before averaging, so gradients of
opposite sign in different batches do not cancel into a falsely low score.
"""

from __future__ import annotations

import torch

from worker.compression.criteria.base import GradientTermCriterion


class TaylorCriterion(GradientTermCriterion):
    name = "taylor"

    def term(self, weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return (weight * gradient).abs()

    def finish(self, total: torch.Tensor, batches_used: int, weight: torch.Tensor) -> torch.Tensor:
        return total / batches_used
