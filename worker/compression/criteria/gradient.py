"""‖∂L/∂w‖ over data: sqrt of the sum of squared per-batch gradients."""

from __future__ import annotations

import torch

from worker.compression.criteria.base import GradientTermCriterion


class GradientCriterion(GradientTermCriterion):
    name = "gradient"

    def term(self, weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.square()

    def finish(self, total: torch.Tensor, batches_used: int, weight: torch.Tensor) -> torch.Tensor:
        return total.sqrt()
