"""What an exporter is and what it hands back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from worker.compression.export import SavedFile, _max_abs_diff
from worker.compression.trial import Trial, Workbench

# A float artifact reloaded in its runtime computes what the in-memory model computes, to float noise.
FLOAT_RELATIVE_TOLERANCE = 1e-4


@dataclass
class Exported:
    artifact: str
    saved: SavedFile
    # The reload check's figures ({"ok", "max_abs_diff", "tolerance", ...}); None where none applies.
    check: dict[str, Any] | None = None
    # What the benchmark runs for this artifact (e.g. the ScriptModule model.ts holds).
    runnable: Any = None


class Exporter(Protocol):
    @property
    def name(self) -> str: ...

    def export(self, trial: Trial, bench: Workbench, directory: Path) -> Exported | None: ...


def check_batch(bench: Workbench) -> torch.Tensor:
    """The seeded three-sample batch every reload check runs."""
    return torch.randn([3, *bench.example.shape[1:]], generator=torch.Generator().manual_seed(0))


def float_reload_check(model: torch.nn.Module, reloaded: Callable[[torch.Tensor], Any], bench: Workbench) -> dict[str, Any]:
    """A float artifact's reload check: ``{"ok", "max_abs_diff", "tolerance", "int8": False}``."""
    inputs = check_batch(bench)
    with torch.no_grad():
        expected = model(inputs)
        actual = reloaded(inputs)
    difference, scale = _max_abs_diff(expected, actual)
    tolerance = FLOAT_RELATIVE_TOLERANCE * max(1.0, scale)
    return {"ok": difference <= tolerance, "max_abs_diff": difference, "tolerance": tolerance, "int8": False}
