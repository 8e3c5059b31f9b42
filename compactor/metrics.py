"""Which Prometheus series a process exposes: its own, or every process's of a ``compactor serve`` tree.

``compactor serve`` points all its processes at one ``PROMETHEUS_MULTIPROC_DIR``; then the
series are read from the files every process writes there. Otherwise a process exposes the
default registry (its own series and Python's process and GC metrics). The gateway's
``/metrics`` and ``compactor worker --metrics-port`` both start from this.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _DefaultRegistrySeries(Collector):
    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def local_series_registry() -> CollectorRegistry:
    """A registry of this process's series, or of the whole tree's under ``compactor serve``;
    callers may register more collectors on it (it is never the global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistrySeries())
    return registry
