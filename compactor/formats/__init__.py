"""Format detection and structural validation of uploaded model and dataset files.

One module per concern: ``limits`` (archive budgets), ``zip_guard``, ``pickle_scan``,
``safetensors``, ``npy``, ``detection``, and ``datasets`` (shapes and sample counts).

Imports no torch: the gateway calls this at submission to refuse bad uploads
before anything is queued, and the worker calls it again before torch sees a
file. Formats are detected from the bytes, never from file names.

What is recognised:

* a ``torch.jit.save`` archive (zip with ``<prefix>/code/`` and
  ``<prefix>/constants.pkl``): ``"torchscript"``;
* a ``torch.save`` zip whose ``<prefix>/data.pkl`` only references the globals
  a plain state_dict (or a dict of tensors) needs: ``"state_dict"`` for
  models, ``"pt"`` for datasets;
* a safetensors file (8-byte little-endian header length + JSON header):
  ``"safetensors"``;
* a numpy ``.npz`` (zip of ``.npy`` entries with plain numeric dtypes):
  ``"npz"`` for datasets.

The pickle is inspected with :func:`pickletools.genops`, which parses opcodes
and never executes them. Every global the pickle would import (``GLOBAL``,
``INST``, ``STACK_GLOBAL``; the operands of ``STACK_GLOBAL`` are tracked
through a small abstract stack and the memo) must be in
:data:`STATE_DICT_GLOBALS`. This is a gate in front of
``torch.load(weights_only=True)``, not a replacement for it: the loader still
uses weights-only loading, and never falls back to anything else.
"""

from __future__ import annotations

from compactor.formats.datasets import DatasetInfo, dataset_info, dataset_num_samples, inspect_dataset
from compactor.formats.detection import (
    DatasetFileFormat,
    ModelFileFormat,
    check_declared_format,
    detect_dataset_format,
    detect_model_format,
)
from compactor.formats.limits import ArchiveLimits
from compactor.formats.npy import NpyHeader, parse_npy_header
from compactor.formats.pickle_scan import STATE_DICT_GLOBALS, MalformedPickle, disallowed_globals, pickle_globals
from compactor.formats.safetensors import SafetensorsEntry, read_safetensors_header
from compactor.formats.zip_guard import check_zip_archive, single_top_level_prefix

__all__ = [
    "STATE_DICT_GLOBALS",
    "ArchiveLimits",
    "DatasetFileFormat",
    "DatasetInfo",
    "MalformedPickle",
    "ModelFileFormat",
    "NpyHeader",
    "SafetensorsEntry",
    "check_declared_format",
    "check_zip_archive",
    "dataset_info",
    "dataset_num_samples",
    "detect_dataset_format",
    "detect_model_format",
    "disallowed_globals",
    "inspect_dataset",
    "parse_npy_header",
    "pickle_globals",
    "read_safetensors_header",
    "single_top_level_prefix",
]
