"""worker.compression.data on real files: digits as .pt and .npz, broken datasets, splits and batch sources."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from compactor.errors import InvalidDataset, InvalidSpec
from worker.compression.data import Dataset, load_dataset, split_dataset, synthetic_data


class TouchOnUnpickle:
    """Unpickling this creates ``path``: a canary for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _save_pt(path: Path, **entries: object) -> Path:
    torch.save(entries, path)
    return path


def _refused(path: Path, fragment: str) -> InvalidDataset:
    with pytest.raises(InvalidDataset) as caught:
        load_dataset(path)
    assert caught.value.code == "invalid_dataset"
    assert fragment in caught.value.message, caught.value.message
    return caught.value


# ------------------------------------------------------------------ loading


def test_pt_and_npz_digits_load_identically(tmp_path: Path, digits) -> None:
    inputs, targets = digits[0], digits[1]
    pt = _save_pt(tmp_path / "digits.pt", inputs=inputs, targets=targets)
    npz = tmp_path / "digits.npz"
    np.savez_compressed(npz, inputs=inputs.numpy(), targets=targets.numpy().astype(np.int32))

    for path in (pt, npz):
        dataset = load_dataset(path)
        assert dataset.inputs.dtype == torch.float32 and dataset.targets is not None
        assert dataset.targets.dtype == torch.int64
        torch.testing.assert_close(dataset.inputs, inputs)
        torch.testing.assert_close(dataset.targets, targets)
        assert len(dataset) == len(targets) and dataset.sample_shape == (1, 8, 8)


def test_uint8_images_are_scaled_to_unit_range_and_targets_are_optional(tmp_path: Path) -> None:
    images = torch.tensor([[[0, 255]], [[51, 102]]], dtype=torch.uint8)
    dataset = load_dataset(_save_pt(tmp_path / "images.pt", inputs=images))
    torch.testing.assert_close(dataset.inputs, torch.tensor([[[0.0, 1.0]], [[0.2, 0.4]]]))
    assert dataset.targets is None


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ({"targets": torch.arange(4)}, "no 'inputs'"),
        ({"inputs": [[1.0], [2.0]]}, "must be a tensor, not list"),
        ({"inputs": torch.zeros(4, 3), "targets": torch.arange(5)}, "'inputs' has 4 samples but 'targets' has 5"),
        ({"inputs": torch.tensor([[1.0], [float("nan")], [3.0]])}, "NaN or Inf values (in 1 of 3 samples"),
        ({"inputs": torch.zeros(4, 3, dtype=torch.int32)}, "dtype torch.int32"),
        ({"inputs": torch.zeros(4, 3), "targets": torch.zeros(4, 2, dtype=torch.long)}, "1-D class indices"),
        ({"inputs": torch.zeros(4, 3), "targets": torch.zeros(4)}, "integer class indices"),
        ({"inputs": torch.zeros(4, 3), "targets": torch.tensor([0, 1, -1, 2])}, "negative class indices"),
        ({"inputs": torch.zeros(1, 3)}, "at least 2"),
        ({"inputs": torch.zeros(4)}, "at least one dimension per sample"),
    ],
)
def test_broken_pt_datasets_are_refused_with_clear_messages(tmp_path: Path, entries: dict[str, object], fragment: str) -> None:
    _refused(_save_pt(tmp_path / "data.pt", **entries), fragment)


def test_npz_without_inputs_or_with_mismatched_lengths_is_refused(tmp_path: Path) -> None:
    no_inputs = tmp_path / "a.npz"
    np.savez(no_inputs, features=np.zeros((4, 3), np.float32))
    _refused(no_inputs, "no 'inputs'")
    mismatched = tmp_path / "b.npz"
    np.savez(mismatched, inputs=np.zeros((4, 3), np.float32), targets=np.arange(3))
    _refused(mismatched, "'targets' has 3")


def test_object_dtype_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, inputs=np.zeros((4, 3), np.float32), targets=np.array([0, "cat", None, 1], dtype=object))
    _refused(path, "object dtype")


def test_pickled_objects_in_pt_dataset_never_run(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = _save_pt(tmp_path / "data.pt", inputs=torch.zeros(4, 3), meta=TouchOnUnpickle(canary))
    _refused(path, "pathlib")
    assert not canary.exists()


def test_model_files_are_not_datasets(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    _refused(path, "no 'inputs'")


# ---------------------------------------------------------------- splitting


def test_split_is_deterministic_disjoint_and_stratified(digits) -> None:
    targets = digits[1]
    # Each input is its own row index, so the split's membership is readable.
    dataset = Dataset(inputs=torch.arange(len(targets), dtype=torch.float32).unsqueeze(1), targets=targets)
    first = split_dataset(dataset, val_fraction=0.1, seed=3)
    again = split_dataset(dataset, val_fraction=0.1, seed=3)
    other = split_dataset(dataset, val_fraction=0.1, seed=4)

    assert first.has_targets and not first.synthetic and first.num_classes_seen == 10
    assert len(first.val) == round(0.1 * len(targets))
    val_rows = set(first.val.inputs.flatten().long().tolist())
    train_rows = set(first.train.inputs.flatten().long().tolist())
    assert not val_rows & train_rows and len(val_rows | train_rows) == len(targets)
    assert first.val.targets is not None and torch.equal(first.val.targets, targets[first.val.inputs.flatten().long()])
    torch.testing.assert_close(first.val.inputs, again.val.inputs)
    assert not torch.equal(first.val.inputs, other.val.inputs)

    expected = torch.bincount(targets, minlength=10).float() * len(first.val) / len(targets)
    assert (torch.bincount(first.val.targets, minlength=10).float() - expected).abs().max() < 1.0


def test_small_classes_keep_a_training_sample_and_val_stays_balanced() -> None:
    targets = torch.tensor([0] * 50 + [1] * 5 + [2] * 5 + [3])
    dataset = Dataset(inputs=torch.arange(len(targets), dtype=torch.float32).unsqueeze(1), targets=targets)
    split = split_dataset(dataset, val_fraction=0.2, seed=0)
    assert split.val.targets is not None and split.train.targets is not None
    assert torch.bincount(split.val.targets, minlength=4).tolist() == [10, 1, 1, 0]
    assert set(split.train.targets.tolist()) == {0, 1, 2, 3}
    assert split.num_classes_seen == 4
    sparse_labels = Dataset(inputs=torch.zeros(4, 1), targets=torch.tensor([0, 5, 0, 5]))
    assert split_dataset(sparse_labels, 0.5, 0).num_classes_seen == 6  # the model needs 6 outputs
    # Both splits keep the dataset's order.
    assert torch.all(split.val.inputs[1:, 0] > split.val.inputs[:-1, 0])


def test_unlabelled_split_and_bad_fraction() -> None:
    dataset = Dataset(inputs=torch.randn(3, 2), targets=None)
    split = split_dataset(dataset, val_fraction=0.01, seed=0)
    assert (len(split.train), len(split.val)) == (2, 1)
    assert not split.has_targets and split.num_classes_seen is None
    with pytest.raises(InvalidSpec) as caught:
        split_dataset(dataset, val_fraction=1.0, seed=0)
    assert caught.value.field == "data.val_fraction"


# ------------------------------------------------------------------ batches


def test_batches_cover_the_split_and_shuffle_per_epoch_deterministically() -> None:
    targets = torch.arange(10) % 3
    split = split_dataset(Dataset(inputs=torch.arange(10.0).unsqueeze(1), targets=targets), val_fraction=0.3, seed=0)

    plain = [batch for batch in split.batches("train", 3)()]
    assert [len(inputs) for inputs, _ in plain] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([inputs for inputs, _ in plain]), split.train.inputs)

    def orders(source) -> list[list[float]]:
        return [torch.cat([inputs for inputs, _ in source()]).flatten().tolist() for _ in range(3)]

    epochs = orders(split.batches("train", 4, shuffle=True, seed=5))
    assert epochs == orders(split.batches("train", 4, shuffle=True, seed=5))
    assert epochs != orders(split.batches("train", 4, shuffle=True, seed=6))
    assert len({tuple(epoch) for epoch in epochs}) > 1  # successive epochs differ
    assert all(sorted(epoch) == sorted(split.train.inputs.flatten().tolist()) for epoch in epochs)

    # Targets travel with their inputs through the shuffle.
    for inputs, batch_targets in split.batches("train", 4, shuffle=True, seed=5, device=torch.device("cpu"))():
        assert batch_targets is not None
        assert torch.equal(batch_targets, inputs.flatten().long() % 3)


def test_synthetic_data_has_the_sample_shape_and_no_targets() -> None:
    data = synthetic_data([1, 3, 16, 16], num_samples=20, seed=1)
    assert data.synthetic and not data.has_targets and data.num_classes_seen is None
    assert data.train.sample_shape == (3, 16, 16) and len(data.train) + len(data.val) == 20
    inputs, targets = next(iter(data.batches("val", 8)()))
    assert targets is None and inputs.shape[1:] == (3, 16, 16)
    torch.testing.assert_close(synthetic_data([1, 3, 16, 16], num_samples=20, seed=1).val.inputs, data.val.inputs)

    capped = synthetic_data([1, 3, 64, 64], num_samples=256, max_elements=3 * 64 * 64 * 10)
    assert len(capped.train) + len(capped.val) == 10
    with pytest.raises(InvalidSpec):
        synthetic_data([1, 3, 64, 64], max_elements=100)
