"""What every pass shares: the ``Trial`` it transforms and the ``Workbench`` it works at.

A trial is one way of compressing the original: the passes built from the spec run over it in
order (``passes/``). The target search runs several trials that differ only in the prune
amount; the frame (``pipeline.py``) exports, measures and reports the one it keeps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactor.catalogue import stage_weight
from compactor.errors import InvalidSpec
from compactor.jobs import Stage
from compactor.spec import JobSpec
from worker.compression import measure
from worker.compression.context import BatchSource, RunContext
from worker.compression.data import SplitData
from worker.compression.progress import ProgressPlan
from worker.compression.pruning import recalibrate_batchnorm


@dataclass
class Trial:
    """One prune amount tried: the float model as the passes leave it, and its deployable form."""

    amount: float
    float_model: nn.Module
    deployable: nn.Module
    accuracy: dict[str, float] | None = None
    masks: dict[str, torch.Tensor] | None = None
    quantization: dict[str, Any] | None = None
    finetune: list[dict[str, Any]] = field(default_factory=list)
    # Where the deployable model runs; None: on the job's device. A quantizer sets it.
    runs_on: torch.device | None = None
    # A pass changed the float architecture (channels removed): a state_dict of it fits no builder.
    architecture_changed: bool = False


class StageClock:
    """Wall-clock seconds per stage, summed over every time a stage runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def as_list(self) -> list[dict[str, Any]]:
        return [{"name": name, "seconds": round(seconds, 4)} for name, seconds in self.seconds.items()]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSpec("device 'cuda' was requested but this worker has no GPU; use 'auto' or 'cpu'", field="device")
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def clone(model: nn.Module) -> nn.Module:
    """An independent copy (its own parameters and buffers) that fine-tuning can optimise."""
    if isinstance(model, torch.jit.ScriptModule):
        # Deep-copying a ScriptModule with autograd on yields non-leaf parameters, which no
        # optimiser accepts; copied without it they are leaves, then regain requires_grad.
        with torch.no_grad():
            copied = copy.deepcopy(model)
        wanted = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
        for name, parameter in copied.named_parameters():
            parameter.requires_grad_(wanted[name])
        return copied
    return copy.deepcopy(model)


class Workbench:
    """The original model, the data feeds, progress and clocks: what passes read, never own."""

    def __init__(self, model: nn.Module, spec: JobSpec, data: SplitData, *, ctx: RunContext, plan: ProgressPlan, clock: StageClock) -> None:
        self.spec = spec
        self.data = data
        self.ctx = ctx
        self.plan = plan
        self.clock = clock
        # The caller's model stays untouched on the CPU; GPU work uses a copy.
        self.original = model.eval()
        self._original_on_device: nn.Module | None = None
        self.batch_size = spec.data.batch_size
        self.example = data.val.inputs[:1].clone() if len(data.val.inputs) else data.train.inputs[:1].clone()
        self.input_shape = [1, *self.example.shape[1:]]
        self._epoch = 0

    def original_on(self, device: torch.device) -> nn.Module:
        if device.type == "cpu":
            return self.original
        if self._original_on_device is None:
            self._original_on_device = clone(self.original).to(device).eval()
        return self._original_on_device

    def new_trial(self, amount: float) -> Trial:
        # Every trial sees the same data order, so two prune amounts differ only by the amount.
        self._epoch = 0
        model = clone(self.original).to(self.ctx.device)
        return Trial(amount=amount, float_model=model, deployable=model)

    # -- data feeds ---------------------------------------------------------------------------
    def train_batches(self, device: torch.device | None = None) -> BatchSource:
        # A new shuffle seed per pass keeps epochs different yet the whole run reproducible.
        def source() -> Any:
            self._epoch += 1
            return self.data.batches("train", self.batch_size, shuffle=True, seed=self.spec.data.seed + self._epoch, device=device)()

        return source

    def calibration_batches(self, device: torch.device | None = None) -> BatchSource:
        """The batches INT8 calibration sees: one fixed shuffled pass, so every quantizer of the job
        (torch.ao's and ONNX Runtime's) calibrates on the same inputs."""
        return self.data.batches("train", self.batch_size, shuffle=True, seed=self.spec.data.seed, device=device)

    def val_batches(self, device: torch.device | None = None) -> BatchSource:
        return self.data.batches("val", self.batch_size, device=device)

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train.inputs) / self.batch_size)

    def teacher(self) -> nn.Module | None:
        """The original as the distillation teacher, when fine-tuning distils (asked, or no targets)."""
        finetune = self.spec.finetune
        if finetune is None or self.data.synthetic or (finetune.distill is None and self.data.has_targets):
            return None
        return self.original_on(self.ctx.device)

    # -- stages -------------------------------------------------------------------------------
    def stage(self, stage: Stage, weight: float | None = None) -> AbstractContextManager[None]:
        """Enter a stage: progress moves on by its planned weight, the clock runs."""
        # Stages without batches (export, benchmark) still stop promptly at their boundary.
        self.ctx.check_cancelled()
        self.plan.begin(stage, stage_weight(stage) if weight is None else weight)
        return self.clock(stage)

    def refresh_batchnorm(self, model: nn.Module) -> None:
        """Re-estimate BatchNorm statistics on the weights fine-tuning left.

        A short fine-tune moves the weights far more than the running statistics follow
        (momentum 0.1 over a few dozen steps): the training loss falls while evaluation,
        which uses the stale statistics, can stay near chance (seen: 0.84 → 0.20 top-1 on a
        50%-channel resnet18 after 12 steps). One pass over training batches fixes it."""
        if not self.data.synthetic:
            recalibrate_batchnorm(model, self.train_batches(self.ctx.device), self.ctx)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float] | None:
        if not self.data.has_targets:
            return None
        return measure.evaluate_accuracy(model, self.val_batches(device), device)

    def deployable_device(self, trial: Trial) -> torch.device:
        return trial.runs_on if trial.runs_on is not None else self.ctx.device

    def evaluate_trial(self, trial: Trial) -> dict[str, float] | None:
        device = self.deployable_device(trial)
        try:
            return self.evaluate(trial.deployable.to(device), device)
        finally:
            # Export and INT8 work happen on the CPU; a trial must not stay on the GPU.
            trial.deployable.to("cpu")
