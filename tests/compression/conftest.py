"""Fixtures the core's tests share."""

from __future__ import annotations

import pytest

from worker.compression.data import Dataset, SplitData, split_dataset


@pytest.fixture(scope="module")
def digits_split(digits) -> SplitData:
    """The digits training set split 80/20 (seed 0), as the service splits an uploaded dataset."""
    train_x, train_y, _, _ = digits
    return split_dataset(Dataset(inputs=train_x, targets=train_y), 0.2, 0)
