"""Types every stage of the core shares: how data is fed, progress, cancellation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from compactor.errors import Cancelled

Batch = tuple[torch.Tensor, torch.Tensor | None]
# Calibration, scoring and training never see paths: they call a BatchSource,
# which yields (inputs, targets-or-None) batches, each call a fresh pass.
BatchSource = Callable[[], Iterable[Batch]]
# progress(stage, fraction_done_within_stage)
ProgressCallback = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


def _no_progress(stage: str, fraction: float) -> None:
    return None


def _never_cancel() -> bool:
    return False


@dataclass
class RunContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: ProgressCallback = _no_progress
    should_cancel: CancelCheck = _never_cancel
    warnings: list[str] = field(default_factory=list)

    def check_cancelled(self) -> None:
        """Called between batches: raises Cancelled when the caller asked to stop."""
        if self.should_cancel():
            raise Cancelled("the job was cancelled")

    def report(self, stage: str, fraction: float) -> None:
        self.progress(stage, min(1.0, max(0.0, fraction)))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def limited(source: BatchSource, max_batches: int) -> Iterator[Batch]:
    for index, batch in enumerate(source()):
        if index >= max_batches:
            return
        yield batch


def is_memory_exhaustion(error: BaseException) -> bool:
    """An allocation failed (Python's MemoryError, or torch's allocator, also through TorchScript)."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text


def first_line(error: BaseException, max_chars: int = 300) -> str:
    """The first line of an error's message (its type where it has none), cut for a report or a job error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
