"""The quantization pass: an INT8 deployable form of the trial's float model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.catalogue import stage_weight
from compactor.jobs import Stage
from compactor.spec import DynamicQuantizeSpec, JobSpec, StaticQuantizeSpec
from worker.compression.quantization import quantize
from worker.compression.trial import Trial, Workbench, clone


@dataclass(frozen=True)
class QuantizePass:
    section: StaticQuantizeSpec | DynamicQuantizeSpec
    stage: Stage = Stage.quantize

    def segments(self) -> list[tuple[Stage, float]]:
        return [(Stage.quantize, stage_weight(Stage.quantize))]

    def run(self, trial: Trial, bench: Workbench) -> None:
        # INT8 kernels are CPU kernels: calibrate (and later benchmark) INT8 on the CPU.
        model = trial.float_model.to("cpu").eval()
        with bench.stage(Stage.quantize):
            result = quantize(
                clone(model),
                self.section,
                example_inputs=bench.example,
                calibration=bench.calibration_batches(torch.device("cpu")),
                ctx=bench.ctx,
            )
        trial.deployable = result.model
        trial.runs_on = result.runs_on
        trial.quantization = {
            "mode": result.mode,
            "backend": result.backend,
            "calibration_batches": result.calibration_batches_used,
            "float_layers": result.float_layers,
        }


def build(section: StaticQuantizeSpec | DynamicQuantizeSpec, spec: JobSpec, has_data: bool) -> QuantizePass:
    return QuantizePass(section)


def register() -> None:
    from worker.compression.passes import register_pass

    register_pass(StaticQuantizeSpec, build)
    register_pass(DynamicQuantizeSpec, build)
