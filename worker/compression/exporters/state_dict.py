"""``model.pt``: the float weights as a state_dict, for the user's own builder of the same architecture."""

from __future__ import annotations

from pathlib import Path

from compactor.catalogue import EXPORTERS
from worker.compression.export import save_state_dict
from worker.compression.exporters.base import Exported
from worker.compression.trial import Trial, Workbench


class StateDictExporter:
    name = "state_dict"

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported:
        path = directory / EXPORTERS[self.name].artifact
        return Exported(artifact=path.name, saved=save_state_dict(trial.float_model, path))
