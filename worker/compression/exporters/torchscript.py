"""``model.ts``: the deployable model (INT8 where quantized) as frozen TorchScript."""

from __future__ import annotations

from pathlib import Path

from compactor.catalogue import EXPORTERS
from compactor.errors import CompressionFailed
from worker.compression.export import save_torchscript, to_torchscript, verify_reload
from worker.compression.exporters.base import Exported
from worker.compression.trial import Trial, Workbench


def quantized_engine(trial: Trial) -> str | None:
    # INT8 weights are repacked for whichever engine is active when frozen or loaded.
    return trial.quantization["backend"] if trial.quantization is not None else None


class TorchScriptExporter:
    name = "torchscript"

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported:
        engine = quantized_engine(trial)
        compiled = to_torchscript(trial.deployable, bench.example, quantized_engine=engine)
        path = directory / EXPORTERS[self.name].artifact
        saved = save_torchscript(compiled, path)
        check = verify_reload(path, trial.deployable, bench.example, quantized_engine=engine)
        if not check.get("ok", False):
            raise CompressionFailed(f"the exported {path.name} does not reproduce the compressed model's outputs: {check}")
        return Exported(artifact=path.name, saved=saved, check=check, runnable=compiled)
