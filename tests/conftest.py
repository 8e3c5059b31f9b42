from __future__ import annotations

import copy

import pytest
import torch

from tests.support.models import TinyCNN, load_digits_tensors, train_classifier

pytest_plugins = ("tests.support.fixtures",)


@pytest.fixture(scope="session", autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    # Two cores: more threads than that only adds contention.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_inputs, train_targets, test_inputs, test_targets) of scikit-learn's digits, [N,1,8,8]."""
    return load_digits_tensors()


@pytest.fixture(scope="session")
def _trained_tiny_cnn(digits) -> TinyCNN:
    train_x, train_y, _, _ = digits
    torch.manual_seed(0)
    return train_classifier(TinyCNN(), train_x, train_y)


@pytest.fixture()
def tiny_cnn(_trained_tiny_cnn: TinyCNN) -> TinyCNN:
    """A fresh copy of the seeded, trained tiny CNN (tests may mutate it)."""
    return copy.deepcopy(_trained_tiny_cnn).eval()
