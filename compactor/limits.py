"""The size limits an upload must fit, in one place, made from Settings.

The gateway checks them at upload (format detection reads the zip's central directory
against them) and the worker's job child checks them again when it loads the files: the
same numbers on both sides, so an upload the gateway accepted is never refused later for
its size (it used to be: datasets up to 8 GiB passed the gateway and failed the worker's
4 GiB check after the 202). Torch-free: the gateway imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from compactor.formats import ArchiveLimits

if TYPE_CHECKING:
    from compactor.settings import Settings

_GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    # Every tensor element of a model (parameters and buffers), from shapes before allocation.
    max_parameters: int = 500_000_000
    model_archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    dataset_archive: ArchiveLimits = field(default_factory=lambda: ArchiveLimits(max_total_uncompressed_bytes=4 * _GIB))
    # Elements of a dataset's ``inputs``, checked before the conversion to float32.
    max_dataset_input_elements: int = 1 << 30

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_parameters=settings.max_parameters,
            dataset_archive=ArchiveLimits(max_total_uncompressed_bytes=settings.max_dataset_bytes),
            # float32 after conversion: the same memory as the largest archive the gateway takes.
            max_dataset_input_elements=settings.max_dataset_bytes // 4,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Limits:
        return cls(
            max_parameters=int(document["max_parameters"]),
            model_archive=ArchiveLimits(**document["model_archive"]),
            dataset_archive=ArchiveLimits(**document["dataset_archive"]),
            max_dataset_input_elements=int(document["max_dataset_input_elements"]),
        )
