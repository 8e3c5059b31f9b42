"""The fine-tuning pass: train the trial's model on the job's data, distilling from the original."""

from __future__ import annotations

from dataclasses import dataclass

from compactor.catalogue import stage_weight
from compactor.jobs import Stage
from compactor.spec import FinetuneSpec, JobSpec
from worker.compression.finetune import finetune
from worker.compression.pruning import apply_masks
from worker.compression.trial import Trial, Workbench


def epoch_shares(epochs: int, steps: int) -> list[int]:
    """The fine-tuning epochs after each of ``steps`` pruning steps (earlier steps get the remainder)."""
    return [epochs // steps + (1 if index < epochs % steps else 0) for index in range(steps)]


def finetune_for(trial: Trial, bench: Workbench, spec: FinetuneSpec, epochs: int) -> None:
    """``epochs`` of fine-tuning on the trial's float model; unstructured zeros stay zero."""
    model = trial.float_model
    masks = trial.masks
    with bench.stage(Stage.finetune, stage_weight(Stage.finetune) * epochs):
        summary = finetune(
            model,
            spec,
            train=bench.train_batches(bench.ctx.device),
            batches_per_epoch=bench.batches_per_epoch(),
            ctx=bench.ctx,
            teacher=bench.teacher(),
            after_step=(lambda: apply_masks(model, masks)) if masks else None,
            epochs=epochs,
        )
        trial.finetune.append(summary.__dict__)
        bench.refresh_batchnorm(model)


@dataclass(frozen=True)
class FinetunePass:
    """The spec's fine-tuning after the structural passes: all of it, or, after pruning in steps,
    the last step's share (the prune pass fine-tunes between its steps)."""

    section: FinetuneSpec
    epochs: int
    stage: Stage = Stage.finetune

    def segments(self) -> list[tuple[Stage, float]]:
        return [(Stage.finetune, stage_weight(Stage.finetune) * self.epochs)] if self.epochs else []

    def run(self, trial: Trial, bench: Workbench) -> None:
        if self.epochs > 0:
            finetune_for(trial, bench, self.section, self.epochs)


def build(section: FinetuneSpec, spec: JobSpec, has_data: bool) -> FinetunePass | None:
    if not has_data:
        return None  # refused by compat.check_compatibility; random inputs cannot teach a model
    prune = spec.prune
    epochs = epoch_shares(section.epochs, prune.steps)[-1] if prune is not None and prune.amount > 0 else section.epochs
    return FinetunePass(section, epochs)


def register() -> None:
    from worker.compression.passes import register_pass

    register_pass(FinetuneSpec, build)
