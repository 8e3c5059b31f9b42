"""Exporters: the deployable artifacts of a finished trial, one small implementation each.

    for exporter in exporters_for(trial):
        exported = exporter.export(trial, bench, out_dir)

An exporter writes one artifact atomically, checks it (a reload compared with the in-memory
model, where the format can be reloaded) and returns what the frame measures, or None (with a
warning on the context) where the trial cannot have this optional artifact. Its facts (the
artifact's name, whether it needs the original architecture) are declared in
``compactor/catalogue.py`` under the same name; a new exporter is its facts there, one file
here and its ``register_exporter`` line below.
"""

from __future__ import annotations

from collections.abc import Collection

from compactor.catalogue import EXPORTERS as EXPORTER_FACTS
from compactor.catalogue import ExporterFacts
from worker.compression.exporters.base import Exported, Exporter
from worker.compression.exporters.onnx import OnnxExporter, OnnxInt8Exporter
from worker.compression.exporters.pt2 import ExportedProgramExporter
from worker.compression.exporters.state_dict import StateDictExporter
from worker.compression.exporters.torchscript import TorchScriptExporter
from worker.compression.trial import Trial

_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> None:
    if exporter.name not in EXPORTER_FACTS:
        raise ValueError(f"exporter {exporter.name!r} is not declared in compactor.catalogue.EXPORTERS")
    _EXPORTERS[exporter.name] = exporter


def registered_exporters() -> dict[str, Exporter]:
    return dict(_EXPORTERS)


def _applies(facts: ExporterFacts, trial: Trial, wanted: Collection[str] | None) -> bool:
    if facts.needs_original_architecture and trial.architecture_changed:
        return False
    if facts.needs_quantization and trial.quantization is None:
        return False
    return facts.always or wanted is None or facts.artifact in wanted


def exporters_for(trial: Trial, wanted: Collection[str] | None = None) -> list[Exporter]:
    """The exporters whose artifact this trial can have, in catalogue order; ``wanted`` (the spec's
    ``artifacts``) narrows them, None meaning all that apply."""
    return [_EXPORTERS[name] for name, facts in EXPORTER_FACTS.items() if _applies(facts, trial, wanted)]


register_exporter(TorchScriptExporter())
register_exporter(StateDictExporter())
register_exporter(ExportedProgramExporter())
register_exporter(OnnxExporter())
register_exporter(OnnxInt8Exporter())

__all__ = ["Exported", "Exporter", "exporters_for", "register_exporter", "registered_exporters"]
