"""How large an uploaded archive may be, entry by entry, before anything reads it."""

from __future__ import annotations

from dataclasses import dataclass

_GIB = 1024**3
_MIB = 1024**2


@dataclass(frozen=True)
class ArchiveLimits:
    """Budgets a zip archive (or safetensors header) must fit before anything reads it.

    Sizes are the *declared* (uncompressed) sizes from the zip's central
    directory; readers downstream (zipfile, torch's miniz reader, numpy) never
    produce more than the declared size, so the budget bounds what is read.
    """

    max_entries: int = 10_000
    # zipfile parses the whole central directory into ZipInfo objects (~600 bytes each, from
    # records as small as 47 bytes) before any entry can be counted: its declared size is
    # checked first. torch writes ~75 bytes per entry; this allows 10,000 entries of 200.
    max_central_directory_bytes: int = 2 * _MIB
    max_total_uncompressed_bytes: int = 8 * _GIB
    # Deflate tops out near 1032:1; real weights and images compress far less
    # than 200:1, so anything above is a bomb (or an all-zero array, which is
    # useless as data anyway).
    max_compression_ratio: float = 200.0
    # Entries smaller than this are exempt from the ratio check: a tiny entry
    # cannot be a bomb, and small constant files compress well.
    ratio_check_min_bytes: int = 64 * 1024
    max_pickle_bytes: int = 64 * _MIB
    # {'inputs': x, 'targets': y} pickles to well under 1 KiB. Whatever else a dataset's
    # pickle holds, the loaders still build as plain containers at ~15x its size (a 12 MiB
    # dict of ints cost 195 MiB to count samples in the gateway, as much in torch's loader).
    max_dataset_pickle_bytes: int = 1 * _MIB
    max_safetensors_header_bytes: int = 64 * _MIB
    max_npy_header_bytes: int = 64 * 1024
