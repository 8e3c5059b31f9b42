"""Second-order (Optimal Brain Damage) saliency ½·F·w².

The Hessian diagonal is approximated by the diagonal empirical Fisher
F = mean over batches of g², which needs only gradients (no second backward).
"""

from __future__ import annotations

import torch

from worker.compression.criteria.base import GradientTermCriterion


class HessianCriterion(GradientTermCriterion):
    name = "hessian"

    def term(self, weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.square()

    def finish(self, total: torch.Tensor, batches_used: int, weight: torch.Tensor) -> torch.Tensor:
        return 0.5 * (total / batches_used) * weight.square()
