"""Turns per-stage fractions into one monotonic overall fraction for the job document."""

from __future__ import annotations

from collections.abc import Callable

from compactor.jobs import Stage

# Stage weights are the catalogue's (compactor.catalogue.STAGES).

# The job reaches 1.0 when it has succeeded, which the worker records, not the core.
CEILING = 0.99


class ProgressPlan:
    def __init__(self, segments: list[tuple[str, float]], sink: Callable[[str, float], None] | None) -> None:
        self._total = sum(weight for _, weight in segments) or 1.0
        self._sink = sink
        self._done = 0.0
        self._current_weight = 0.0
        self._reported = 0.0
        self._stage: str | None = None

    @property
    def stage(self) -> str | None:
        return self._stage

    @property
    def overall(self) -> float:
        return self._reported

    def begin(self, stage: str, weight: float) -> None:
        self._done += self._current_weight
        self._current_weight = weight
        self._stage = stage
        self.report(stage, 0.0)

    def skip(self, weight: float) -> None:
        """Account for planned work that turned out unnecessary (e.g. a search that stopped early)."""
        self._done += weight
        self.report(self._stage or Stage.load, 0.0)

    def report(self, stage: str, fraction: float) -> None:
        overall = (self._done + self._current_weight * min(max(fraction, 0.0), 1.0)) / self._total
        overall = min(CEILING, max(self._reported, overall))
        self._reported = overall
        if self._sink is not None:
            self._sink(stage, overall)
