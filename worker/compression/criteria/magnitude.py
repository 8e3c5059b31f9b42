"""|w|: the classic data-free baseline."""

from __future__ import annotations

import torch
from torch import nn

from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria.base import SCORE_STAGE, Criterion, to_scores


class MagnitudeCriterion(Criterion):
    name = "magnitude"

    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        scores = to_scores({name: parameter.detach().abs() for name, parameter in parameters.items()})
        ctx.report(SCORE_STAGE, 1.0)
        return scores
