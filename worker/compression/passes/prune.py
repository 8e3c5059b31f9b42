"""The pruning pass: score, then remove weights or whole channels, in ``steps`` rounds.

Between rounds the model is fine-tuned with that round's share of the spec's epochs (the
fine-tuning pass takes the last share), so each round scores a model that recovered from the
one before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.catalogue import stage_weight
from compactor.errors import InvalidSpec
from compactor.jobs import Stage
from compactor.spec import FinetuneSpec, JobSpec, PruneSpec
from worker.compression.criteria import get_criterion
from worker.compression.passes.finetune import epoch_shares, finetune_for
from worker.compression.pruning import (
    prunable_layers,
    prune_channels,
    prune_unstructured,
    recalibrate_batchnorm,
    scoring_parameters,
)
from worker.compression.trial import Trial, Workbench


@dataclass(frozen=True)
class PrunePass:
    section: PruneSpec
    # Fine-tuning between rounds (None without a finetune section or without data).
    finetune: FinetuneSpec | None
    stage: Stage = Stage.prune

    def _epochs_after_round(self) -> list[int]:
        if self.finetune is None:
            return [0] * self.section.steps
        shares = epoch_shares(self.finetune.epochs, self.section.steps)
        return [*shares[:-1], 0]  # the last share is the fine-tuning pass's

    def segments(self) -> list[tuple[Stage, float]]:
        if self.section.amount <= 0:
            return []
        planned: list[tuple[Stage, float]] = []
        for epochs in self._epochs_after_round():
            planned += [(Stage.score, stage_weight(Stage.score)), (Stage.prune, stage_weight(Stage.prune))]
            if epochs:
                planned.append((Stage.finetune, stage_weight(Stage.finetune) * epochs))
        return planned

    def run(self, trial: Trial, bench: Workbench) -> None:
        prune = self.section
        if prune.amount <= 0:
            return
        ctx = bench.ctx
        device = ctx.device
        criterion = get_criterion(prune.criterion)
        channel_mode = prune.granularity == "channel"
        example = bench.example.to(device)
        for round_index, epochs_after in enumerate(self._epochs_after_round()):
            model = trial.float_model
            layers = prunable_layers(model, prune.exclude, channel_mode=channel_mode, example_inputs=example)
            if not layers:
                raise InvalidSpec("no prunable Conv/Linear layer is left after 'exclude'", field="prune.exclude")
            with bench.stage(Stage.score):
                parameters = scoring_parameters(model, layers, channel_mode=channel_mode)
                batches = bench.train_batches(device) if not bench.data.synthetic else None
                scores = criterion.score(model, parameters, batches, ctx, prune.score_batches)
            with bench.stage(Stage.prune):
                if channel_mode:
                    self._remove_channels(trial, bench, scores)
                else:
                    cumulative = prune.amount * (round_index + 1) / prune.steps
                    trial.masks = prune_unstructured(model, scores, cumulative, prune.scope, layers, previous_masks=trial.masks)
            if epochs_after and self.finetune is not None:
                finetune_for(trial, bench, self.finetune, epochs_after)

    def _remove_channels(self, trial: Trial, bench: Workbench, scores: dict[str, torch.Tensor]) -> None:
        prune = self.section
        ctx = bench.ctx
        model = trial.float_model
        # Each round removes the same share of what is left, reaching `amount` after the last.
        round_amount = 1.0 - (1.0 - prune.amount) ** (1.0 / prune.steps)
        prune_channels(model, bench.example.to(ctx.device), scores, round_amount, prune.scope, prune.exclude, ctx)
        trial.architecture_changed = True
        if not bench.data.synthetic:
            recalibrate_batchnorm(model, bench.train_batches(ctx.device), ctx)
        else:
            ctx.warn("BatchNorm statistics were not re-estimated after channel pruning: no dataset was given")


def build(section: PruneSpec, spec: JobSpec, has_data: bool) -> PrunePass:
    return PrunePass(section, spec.finetune if has_data else None)


def register() -> None:
    from worker.compression.passes import register_pass

    register_pass(PruneSpec, build)
