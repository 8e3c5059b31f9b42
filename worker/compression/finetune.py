"""Fine-tuning after pruning: SGD/Adam/AdamW, cosine schedule, optional distillation.

Distillation from the original model is also how unlabeled data is used: a batch
without targets is trained on the teacher's soft outputs alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compactor.jobs import Stage
from compactor.spec import FinetuneSpec
from worker.compression.context import BatchSource, RunContext


@dataclass
class FinetuneReport:
    epochs: int
    steps: int
    final_loss: float | None
    distilled: bool


def _optimizer(parameters: list[nn.Parameter], spec: FinetuneSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.momentum > 0)
    if spec.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # T² keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.).
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    ) * (temperature**2)


def finetune(
    model: nn.Module,
    spec: FinetuneSpec,
    *,
    train: BatchSource,
    batches_per_epoch: int,
    ctx: RunContext,
    teacher: nn.Module | None = None,
    after_step: Callable[[], None] | None = None,
    epochs: int | None = None,
    stage: str = Stage.finetune,
) -> FinetuneReport:
    """Train ``model`` in place on ``ctx.device``; ``after_step`` re-applies pruning masks."""
    epochs = spec.epochs if epochs is None else epochs
    device = ctx.device
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not parameters or batches_per_epoch == 0:
        return FinetuneReport(epochs=0, steps=0, final_loss=None, distilled=False)
    optimizer = _optimizer(parameters, spec)
    total_steps = epochs * batches_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    distill = spec.distill
    if teacher is not None:
        teacher.to(device).eval()

    step = 0
    last_loss: float | None = None
    used_teacher = False
    was_training = model.training
    model.train()
    try:
        for _ in range(epochs):
            for inputs, targets in train():
                ctx.check_cancelled()
                inputs = inputs.to(device, non_blocking=True)
                logits = model(inputs)
                loss = torch.zeros((), device=device)
                label_weight = 1.0
                if teacher is not None and (distill is not None or targets is None):
                    with torch.no_grad():
                        teacher_logits = teacher(inputs)
                    temperature = distill.temperature if distill is not None else 1.0
                    alpha = 1.0 if targets is None else distill.alpha  # type: ignore[union-attr]
                    loss = loss + alpha * distillation_loss(logits, teacher_logits, temperature)
                    label_weight = 1.0 - alpha
                    used_teacher = True
                if targets is not None and label_weight > 0:
                    loss = loss + label_weight * F.cross_entropy(logits, targets.to(device, non_blocking=True))
                if not loss.requires_grad:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if after_step is not None:
                    after_step()
                step += 1
                last_loss = float(loss.detach())
                if not math.isfinite(last_loss):
                    from compactor.errors import CompressionFailed

                    raise CompressionFailed(
                        f"fine-tuning diverged (loss {last_loss}) at step {step}: lower finetune.lr (now {spec.lr})",
                        field="finetune.lr",
                    )
                ctx.report(stage, step / total_steps)
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return FinetuneReport(epochs=epochs, steps=step, final_loss=last_loss, distilled=used_teacher)
