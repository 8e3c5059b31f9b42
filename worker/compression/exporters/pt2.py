"""``model.pt2``: the compressed model as a ``torch.export`` program, for users moving off TorchScript.

It loads with ``torch.export.load(path).module()`` and nothing of Compactor, keeps a dynamic
batch dimension, and is checked by reading it back with Compactor's own safe reader
(``worker/compression/pt2.py``: weights-only, every op allowlisted), so it can be uploaded again.

torch.ao's INT8 modules hold their weights in TorchBind packed-parameter objects that
``torch.export`` cannot carry (``Conv2dPackedParamsBase`` has no ``__obj_flatten__`` in torch
2.14.1); a quantized job's ``model.pt2`` is therefore the float compressed model, and the check
says so (``"int8": false``). An architecture torch.export cannot capture gets no ``model.pt2``
and a warning naming why; ``model.ts`` does not depend on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compactor.catalogue import EXPORTERS
from compactor.errors import CompactorError
from worker.compression.context import first_line, is_memory_exhaustion
from worker.compression.export import _write_atomically, quiet_export
from worker.compression.exporters.base import Exported, float_reload_check
from worker.compression.trial import Trial, Workbench

_MAX_BATCH = 4096


def _export(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    # Two samples: torch.export specialises a dimension whose example size is 1.
    inputs = example.expand(2, *example.shape[1:]).clone() if example.shape[0] == 1 else example
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with quiet_export():
        return torch.export.export(model.eval(), (inputs,), dynamic_shapes=({0: batch},))


class ExportedProgramExporter:
    name = "pt2"

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported | None:
        from worker.compression.pt2 import load_exported_program

        model = trial.float_model.to("cpu").eval()
        path = directory / EXPORTERS[self.name].artifact
        try:
            program = _export(model, bench.example.cpu())
        except Exception as error:  # torch.export fails in many ways on what it cannot capture
            if is_memory_exhaustion(error):
                raise
            bench.ctx.warn(f"no model.pt2: torch.export cannot capture the compressed model ({type(error).__name__}: {first_line(error, 240)})")
            return None
        saved = _write_atomically(path, lambda handle: torch.export.save(program, handle))
        try:
            reloaded = load_exported_program(path).module()
        except CompactorError as refused:  # an op Compactor's own reader refuses: not a re-uploadable program
            path.unlink(missing_ok=True)
            bench.ctx.warn(f"no model.pt2: Compactor's reader refuses the exported program ({refused.message})")
            return None
        check = float_reload_check(model, reloaded, bench)
        difference = check["max_abs_diff"]
        if not check["ok"]:
            path.unlink(missing_ok=True)
            bench.ctx.warn(f"no model.pt2: the exported program does not reproduce the compressed model (max abs diff {difference:.3g})")
            return None
        if trial.quantization is not None:
            bench.ctx.warn(
                "model.pt2 holds the float compressed model: torch.export cannot carry torch.ao's INT8 packed weights; model.ts is the INT8 artifact"
            )
        # A callable, not the module: an unlifted export refuses .eval(), which the measuring code calls on modules.
        return Exported(artifact=path.name, saved=saved, check=check, runnable=lambda inputs: reloaded(inputs))
