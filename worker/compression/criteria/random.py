"""Seeded uniform scores: the baseline any real criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from worker.compression.context import BatchSource, RunContext
from worker.compression.criteria.base import SCORE_STAGE, Criterion


class RandomCriterion(Criterion):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        batches: BatchSource | None,
        ctx: RunContext,
        max_batches: int,
    ) -> dict[str, torch.Tensor]:
        # Sorted names: the same seed gives the same scores whatever order the caller passes.
        generator = torch.Generator().manual_seed(self.seed)
        scores = {name: torch.rand(parameters[name].shape, generator=generator, dtype=torch.float32) for name in sorted(parameters)}
        ctx.report(SCORE_STAGE, 1.0)
        return scores
