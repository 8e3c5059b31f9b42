"""What an exporter is and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.compression.export import SavedFile
from worker.compression.trial import Trial, Workbench


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
