"""Passes: the stages of a trial, built from the spec, keyed by spec section type.

    passes = build_passes(spec, has_data=True)
    trial = run_trial(passes, bench, amount)

Each spec section type (``PruneSpec``, ``FinetuneSpec``, ``StaticQuantizeSpec`` …) has one
builder here (the shape of torchao's config type → handler registry); a builder returns the
section's ``Pass``, or None when another pass already does its work. Passes run in the order
their sections are declared in ``JobSpec``. A pass states its progress segments up front, so the
progress plan is the sum of the passes' segments and never copies their control flow.

A new stage is: its spec section (``compactor/spec.py``), its ``Stage`` member and weight
(``compactor/jobs.py``, ``compactor/catalogue.py``), and one file here with its pass and a
``register_pass`` line; ``pipeline.py`` does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from compactor.jobs import Stage
from compactor.spec import JobSpec
from worker.compression.trial import Trial, Workbench

# (stage, progress weight) of one stretch of planned work.
Segment = tuple[Stage, float]


class Pass(Protocol):
    """One transformation of a trial."""

    @property
    def stage(self) -> Stage: ...

    def segments(self) -> list[Segment]:
        """The progress this pass will report, planned before it runs."""
        ...

    def run(self, trial: Trial, bench: Workbench) -> None:
        """Transform ``trial`` in place (its float model, deployable form and facts)."""
        ...


_SectionT = TypeVar("_SectionT", bound=BaseModel)
# builder(section, whole spec, has_data) -> the pass, or None when there is nothing for it to do.
PassBuilder = Callable[[Any, JobSpec, bool], Pass | None]

_BUILDERS: dict[type[BaseModel], PassBuilder] = {}


def register_pass(section: type[_SectionT], builder: Callable[[_SectionT, JobSpec, bool], Pass | None]) -> None:
    existing = _BUILDERS.get(section)
    if existing is not None and existing is not builder:
        raise ValueError(f"a pass is already registered for {section.__name__}")
    _BUILDERS[section] = builder


def registered_sections() -> frozenset[type[BaseModel]]:
    return frozenset(_BUILDERS)


def build_passes(spec: JobSpec, *, has_data: bool) -> list[Pass]:
    passes: list[Pass] = []
    for name in type(spec).model_fields:
        section = getattr(spec, name)
        builder = _BUILDERS.get(type(section)) if isinstance(section, BaseModel) else None
        if builder is not None:
            built = builder(section, spec, has_data)
            if built is not None:
                passes.append(built)
    return passes


def planned_segments(passes: list[Pass]) -> list[Segment]:
    return [segment for step in passes for segment in step.segments()]


def run_trial(passes: list[Pass], bench: Workbench, amount: float) -> Trial:
    """A fresh copy of the original through every pass; the float model ends on the CPU."""
    trial = bench.new_trial(amount)
    for step in passes:
        step.run(trial, bench)
    # Export and INT8 kernels are CPU work; a float deployable is the float model itself.
    trial.float_model.to("cpu").eval()
    return trial


# Registration: one line per pass module, at the bottom because they use the types above.
from worker.compression.passes import finetune as _finetune  # noqa: E402
from worker.compression.passes import prune as _prune  # noqa: E402
from worker.compression.passes import quantize as _quantize  # noqa: E402

_prune.register()
_finetune.register()
_quantize.register()

__all__ = ["Pass", "PassBuilder", "Segment", "build_passes", "planned_segments", "register_pass", "registered_sections", "run_trial"]
