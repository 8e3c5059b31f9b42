"""Datasets for scoring, fine-tuning, calibration and evaluation, loaded without arbitrary unpickling.

Accepted files (format detected from the bytes by :mod:`compactor.formats`):

* ``.pt``: ``torch.save({"inputs": Tensor[N, ...], "targets": LongTensor[N]})``
  read with ``torch.load(weights_only=True)``; extra keys are ignored;
* ``.npz``: arrays ``inputs`` and optional ``targets``, read with
  ``numpy.load(allow_pickle=False)``.

Conversions, decided once here:

* float16 / bfloat16 / float64 inputs become float32;
* **uint8 inputs are taken as image bytes and scaled to [0, 1]** (``x / 255``,
  torchvision's ``ToTensor`` convention), because that is how image datasets
  are usually stored; models trained on other normalisations should be given
  float inputs already normalised as they were in training;
* other integer, bool and complex inputs are refused (a classifier of images
  or features takes floats; token ids would need an embedding model that the
  torchvision architectures are not);
* targets must be a 1-D integer tensor of non-negative class indices; they
  become int64.

Calibration and training never see paths: :meth:`SplitData.batches` hands
out a :data:`BatchSource`, each call a fresh pass over one split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from compactor.errors import InvalidDataset, InvalidSpec
from compactor.formats import ArchiveLimits, DatasetFileFormat, detect_dataset_format
from compactor.limits import Limits
from worker.compression.context import Batch, BatchSource
from worker.compression.loading import all_finite

Split = Literal["train", "val"]

_FLOAT_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGER_TARGET_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Mixes the pass number into the seed; an odd 64-bit constant keeps passes of nearby seeds apart.
_PASS_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class DatasetLimits:
    # The defaults are compactor.limits.Limits' (the gateway's); the worker passes the configured ones.
    archive: ArchiveLimits = field(default_factory=lambda: Limits().dataset_archive)
    # Elements of ``inputs``, checked before the conversion to float32 (4 bytes each).
    max_input_elements: int = Limits().max_dataset_input_elements


@dataclass(frozen=True)
class Dataset:
    """``inputs`` float32 [N, ...]; ``targets`` int64 [N] class indices, or None without labels."""

    inputs: torch.Tensor
    targets: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])


@dataclass(frozen=True)
class SplitData:
    """A train/validation split; the validation split is never trained on."""

    train: Dataset
    val: Dataset
    synthetic: bool
    has_targets: bool
    # Largest label + 1 over the whole dataset (None without targets): the
    # fewest outputs a classifier needs for these labels. Labels need not all
    # occur; {0, 5} gives 6.
    num_classes_seen: int | None

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> BatchSource:
        """A BatchSource over one split: each call of it is a fresh pass (an epoch).

        Unshuffled passes go in dataset order. Shuffled pass ``k`` (the k-th
        call of this source, from 0) uses a permutation determined by
        ``(seed, k)`` alone: successive epochs see different orders, and two
        sources made with the same seed replay the same sequence of orders.
        The last batch may be smaller than ``batch_size``.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        dataset = self.train if split == "train" else self.val
        pass_counter = itertools.count()

        def source() -> Iterator[Batch]:
            pass_index = next(pass_counter)
            return _iterate(dataset, batch_size, _pass_order(len(dataset), shuffle, seed, pass_index), device)

        return source


def _pass_order(count: int, shuffle: bool, seed: int, pass_index: int) -> torch.Tensor | None:
    if not shuffle:
        return None
    pass_seed = (seed * _PASS_SEED_STRIDE + pass_index) % (1 << 63)
    return torch.randperm(count, generator=torch.Generator().manual_seed(pass_seed))


def _iterate(dataset: Dataset, batch_size: int, order: torch.Tensor | None, device: torch.device | None) -> Iterator[Batch]:
    for start in range(0, len(dataset), batch_size):
        if order is None:
            inputs = dataset.inputs[start : start + batch_size]
            targets = None if dataset.targets is None else dataset.targets[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            inputs = dataset.inputs[index]
            targets = None if dataset.targets is None else dataset.targets[index]
        if device is not None:
            inputs = inputs.to(device)
            targets = None if targets is None else targets.to(device)
        yield inputs, targets


# -------------------------------------------------------------------- loading


def load_dataset(path: Path, limits: DatasetLimits = DatasetLimits()) -> Dataset:
    """Load and validate a dataset file; raises InvalidDataset saying what is wrong and how to fix it."""
    file_format: DatasetFileFormat = detect_dataset_format(path, limits.archive)
    if file_format == "pt":
        inputs, targets = _read_pt(path)
    else:
        inputs, targets = _read_npz(path)
    return validate_dataset(inputs, targets, limits)


def _read_pt(path: Path) -> tuple[object, object]:
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # never retried unsafely; the file is the problem
        raise InvalidDataset(
            f"the .pt dataset cannot be loaded with weights-only unpickling ({type(exc).__name__}); "
            "save a plain dict of tensors: torch.save({'inputs': x, 'targets': y}, f)"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise InvalidDataset(f"the .pt dataset holds a {type(loaded).__name__}; expected a dict with 'inputs' and optional 'targets' tensors")
    if "inputs" not in loaded:
        shown = ", ".join(repr(key) for key in list(loaded)[:5])
        raise InvalidDataset(f"the .pt dataset has no 'inputs' (its keys: {shown or 'none'})")
    return loaded["inputs"], loaded.get("targets")


def _read_npz(path: Path) -> tuple[object, object]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "inputs" not in archive.files:
                raise InvalidDataset(f"the .npz has no 'inputs' array (it has: {', '.join(archive.files[:5]) or 'none'})")
            inputs = torch.from_numpy(np.ascontiguousarray(archive["inputs"]))
            targets = torch.from_numpy(np.ascontiguousarray(archive["targets"])) if "targets" in archive.files else None
    except InvalidDataset:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors on damaged files
        raise InvalidDataset(f"the .npz dataset cannot be read: {exc}") from exc
    return inputs, targets


def validate_dataset(inputs: object, targets: object, limits: DatasetLimits = DatasetLimits()) -> Dataset:
    """Check and convert raw ``inputs``/``targets`` (see the module docstring for the rules)."""
    if not isinstance(inputs, torch.Tensor):
        raise InvalidDataset(f"'inputs' must be a tensor, not {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise InvalidDataset(f"'inputs' must be [N, ...] with at least one dimension per sample; got shape {list(inputs.shape)}")
    count = int(inputs.shape[0])
    if count < 2:
        raise InvalidDataset(f"the dataset has {count} sample(s); at least 2 are needed to split training from validation")
    if inputs.numel() > limits.max_input_elements:
        raise InvalidDataset(f"'inputs' has {inputs.numel():,} elements, more than the limit of {limits.max_input_elements:,}")

    if inputs.dtype == torch.uint8:
        converted = inputs.to(torch.float32).div_(255.0)
    elif inputs.dtype in _FLOAT_INPUT_DTYPES:
        converted = inputs.to(torch.float32)
    else:
        raise InvalidDataset(f"'inputs' has dtype {inputs.dtype}; use floating point inputs (or uint8 images, which are scaled to [0, 1])")
    converted = converted.contiguous()
    if not all_finite(converted):
        bad = int((~torch.isfinite(converted)).flatten(1).any(1).sum())
        raise InvalidDataset(f"'inputs' contains NaN or Inf values (in {bad} of {count} samples, after conversion to float32)")

    return Dataset(inputs=converted, targets=None if targets is None else _validate_targets(targets, count))


def _validate_targets(targets: object, count: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise InvalidDataset(f"'targets' must be a tensor, not {type(targets).__name__}")
    if targets.dim() != 1:
        raise InvalidDataset(f"'targets' must be 1-D class indices [N]; got shape {list(targets.shape)} (squeeze or argmax one-hot targets)")
    if targets.dtype not in _INTEGER_TARGET_DTYPES:
        raise InvalidDataset(f"'targets' must be integer class indices; got dtype {targets.dtype}")
    if int(targets.shape[0]) != count:
        raise InvalidDataset(f"'inputs' has {count} samples but 'targets' has {int(targets.shape[0])}; they must match")
    targets = targets.to(torch.int64).contiguous()
    if bool((targets < 0).any()):
        raise InvalidDataset(f"'targets' contains negative class indices (smallest: {int(targets.min())}); classes are 0..C-1")
    return targets


# ------------------------------------------------------------------ splitting


def split_dataset(dataset: Dataset, val_fraction: float, seed: int) -> SplitData:
    """A deterministic train/validation split of round(N * val_fraction) samples (at least 1 each side).

    With targets the split is stratified: each class contributes to validation
    in proportion to its size (largest-remainder rounding, never taking a
    class's last training sample while another class has room), so small
    validation splits stay balanced. Both splits keep the dataset's order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidSpec(f"data.val_fraction must lie strictly between 0 and 1, not {val_fraction}", field="data.val_fraction")
    count = len(dataset)
    if count < 2:
        raise InvalidDataset(f"the dataset has {count} sample(s); at least 2 are needed to split training from validation")
    val_count = min(count - 1, max(1, round(count * val_fraction)))
    generator = torch.Generator().manual_seed(seed)

    if dataset.targets is None:
        val_index = torch.randperm(count, generator=generator)[:val_count]
    else:
        val_index = _stratified_val_index(dataset.targets, val_count, generator)
    is_val = torch.zeros(count, dtype=torch.bool)
    is_val[val_index] = True
    train_index = torch.nonzero(~is_val).flatten()
    val_index = torch.nonzero(is_val).flatten()

    def take(index: torch.Tensor) -> Dataset:
        targets = None if dataset.targets is None else dataset.targets[index]
        return Dataset(inputs=dataset.inputs[index], targets=targets)

    has_targets = dataset.targets is not None
    return SplitData(
        train=take(train_index),
        val=take(val_index),
        synthetic=False,
        has_targets=has_targets,
        num_classes_seen=int(dataset.targets.max()) + 1 if dataset.targets is not None else None,
    )


def _stratified_val_index(targets: torch.Tensor, val_count: int, generator: torch.Generator) -> torch.Tensor:
    classes, class_sizes = torch.unique(targets, return_counts=True)
    fraction = val_count / len(targets)
    quotas = [int(size) * fraction for size in class_sizes]
    takes = [math.floor(quota) for quota in quotas]
    remaining = val_count - sum(takes)
    # Random tie-break keeps equal remainders from always favouring low labels.
    tie_break = torch.rand(len(classes), generator=generator).tolist()

    def keeps_a_training_sample(position: int) -> bool:
        return takes[position] + 1 <= int(class_sizes[position]) - 1

    ranked = sorted(range(len(classes)), key=lambda position: (-(quotas[position] - takes[position]), tie_break[position]))
    for position in [p for p in ranked if keeps_a_training_sample(p)] + [p for p in ranked if not keeps_a_training_sample(p)]:
        if remaining == 0:
            break
        if takes[position] < int(class_sizes[position]):
            takes[position] += 1
            remaining -= 1

    chosen: list[torch.Tensor] = []
    for label, take in zip(classes.tolist(), takes, strict=True):
        members = torch.nonzero(targets == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen)


def synthetic_data(
    input_shape: list[int],
    num_samples: int = 256,
    seed: int = 0,
    *,
    val_fraction: float = 0.2,
    max_elements: int = 1 << 27,
) -> SplitData:
    """Random normal inputs of the per-sample shape ``input_shape[1:]``, without targets.

    For jobs without a dataset: enough to calibrate, benchmark and compare
    outputs (fidelity), never to measure accuracy. Large per-sample shapes
    get fewer samples so the whole stays within ``max_elements`` (512 MiB of
    float32 by default); at least 2 samples are always made.
    """
    if len(input_shape) < 2 or any(dim < 1 for dim in input_shape):
        raise InvalidSpec(f"model.input_shape must be [batch, ...] of positive sizes, not {input_shape}", field="model.input_shape")
    sample_shape = list(input_shape[1:])
    per_sample = math.prod(sample_shape)
    if 2 * per_sample > max_elements:
        raise InvalidSpec(
            f"model.input_shape {input_shape} is too large for synthetic data ({per_sample:,} elements per sample)",
            field="model.input_shape",
        )
    count = max(2, min(num_samples, max_elements // per_sample))
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn([count, *sample_shape], generator=generator)
    split = split_dataset(Dataset(inputs=inputs, targets=None), val_fraction, seed)
    return SplitData(train=split.train, val=split.val, synthetic=True, has_targets=False, num_classes_seen=None)


__all__ = [
    "Dataset",
    "DatasetLimits",
    "SplitData",
    "load_dataset",
    "split_dataset",
    "synthetic_data",
    "validate_dataset",
]
