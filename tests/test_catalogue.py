"""The catalogue, the spec's literals and the core's registries name the same methods.

A method is declared once (compactor/catalogue.py) and implemented once under the same name;
this is the test that says so, and the README's "how to add" counts its files from it.
"""

from __future__ import annotations

import inspect
from typing import get_args

import pytest
from pydantic import BaseModel

from compactor import catalogue
from compactor.formats import ModelFileFormat
from compactor.jobs import Stage
from compactor.spec import (
    Criterion,
    DataSpec,
    DynamicQuantizeSpec,
    FinetuneSpec,
    JobSpec,
    ModelFormat,
    ModelSpec,
    NotifySpec,
    PruneSpec,
    QuantMode,
    StaticQuantizeSpec,
    TargetSpec,
)


def test_the_spec_offers_what_the_catalogue_declares() -> None:
    assert set(get_args(Criterion)) == set(catalogue.CRITERIA)
    assert set(get_args(QuantMode)) == set(catalogue.QUANT_MODES)
    quant_tags = {section.model_fields["mode"].default for section in (StaticQuantizeSpec,)} | set(
        get_args(DynamicQuantizeSpec.model_fields["mode"].annotation)
    )
    assert quant_tags == set(catalogue.QUANT_MODES)
    assert set(get_args(ModelFormat)) - {"auto"} == set(catalogue.MODEL_FORMATS) == set(get_args(ModelFileFormat))
    assert set(catalogue.STAGES) == set(Stage)


def test_the_core_implements_each_entry_once_under_its_name() -> None:
    from worker.compression.criteria import CRITERIA
    from worker.compression.criteria.base import GradientTermCriterion
    from worker.compression.exporters import registered_exporters
    from worker.compression.loading import model_readers
    from worker.compression.quantization import available_modes

    assert set(CRITERIA) == set(catalogue.CRITERIA)
    for name, cls in CRITERIA.items():
        # A criterion built from gradients cannot run without data, and the catalogue must say so.
        assert issubclass(cls, GradientTermCriterion) <= catalogue.CRITERIA[name].needs_data, name
    assert set(available_modes()) == set(catalogue.QUANT_MODES)
    assert model_readers() == set(catalogue.MODEL_FORMATS)
    assert set(registered_exporters()) == set(catalogue.EXPORTERS)


def test_every_stage_section_of_the_spec_has_a_pass() -> None:
    from worker.compression.passes import registered_sections

    assert registered_sections() == {PruneSpec, FinetuneSpec, StaticQuantizeSpec, DynamicQuantizeSpec}
    # A new section either transforms the model (it has a pass) or configures the job (listed here).
    sections = {section for field in JobSpec.model_fields.values() for section in _models_in(field.annotation)}
    assert sections - registered_sections() == {ModelSpec, DataSpec, TargetSpec, NotifySpec}


def _models_in(annotation: object) -> set[type[BaseModel]]:
    if inspect.isclass(annotation):
        return {annotation} if issubclass(annotation, BaseModel) else set()
    return {model for argument in get_args(annotation) for model in _models_in(argument)}


def test_registries_refuse_what_the_catalogue_does_not_declare() -> None:
    from worker.compression.criteria import register_criterion
    from worker.compression.criteria.magnitude import MagnitudeCriterion
    from worker.compression.exporters import register_exporter
    from worker.compression.quantization import register_quantizer

    class Undeclared(MagnitudeCriterion):
        name = "undeclared"

    with pytest.raises(ValueError, match="not declared"):
        register_criterion(Undeclared)
    with pytest.raises(ValueError, match="not declared"):
        register_quantizer("int4", lambda *args, **kwargs: None)  # type: ignore[arg-type,return-value]

    class Unnamed:
        name = "onnx-someday"

        def export(self, *args: object) -> None: ...

    with pytest.raises(ValueError, match="not declared"):
        register_exporter(Unnamed())  # type: ignore[arg-type]


def test_facts_drive_the_rules() -> None:
    from compactor.compat import check_compatibility
    from compactor.errors import InvalidSpec, UnsupportedCombination
    from compactor.spec import parse_spec

    assert catalogue.runs_uploaded_code("torchscript")
    assert not catalogue.runs_uploaded_code("state_dict") and not catalogue.runs_uploaded_code(None)
    for name, facts in catalogue.MODEL_FORMATS.items():
        channel = parse_spec({"prune": {"granularity": "channel"}, "model": {"arch": "resnet18"}})
        check_compatibility(name, channel, None)  # every format can lose channels (TorchScript as a converted graph)
        if facts.needs_arch:
            with pytest.raises(InvalidSpec) as missing:
                check_compatibility(name, parse_spec({}), None)
            assert missing.value.field == "model.arch"
    for name, criterion in catalogue.CRITERIA.items():
        spec = parse_spec({"prune": {"criterion": name, "granularity": "unstructured"}})
        if criterion.needs_data:
            with pytest.raises(UnsupportedCombination):
                check_compatibility("torchscript", spec, None)
        else:
            check_compatibility("torchscript", spec, None)


def test_a_job_hands_back_the_exporters_artifacts_and_the_report() -> None:
    from worker.sandbox import ARTIFACT_NAMES

    assert {facts.artifact for facts in catalogue.EXPORTERS.values()} | {"report.json"} == ARTIFACT_NAMES
    assert all(facts.progress_weight > 0 for facts in catalogue.STAGES.values())
