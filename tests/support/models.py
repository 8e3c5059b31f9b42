"""Small real models and real data for the tests: scikit-learn's digits and a tiny CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Three conv blocks and a linear head; big enough that weights dominate its TorchScript size."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as [N,1,8,8] floats in [0,1]; a fixed 80/20 train/held-out split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    return inputs[train], targets[train], inputs[test], targets[test]


def train_classifier(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int = 12,
    lr: float = 3e-3,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> nn.Module:
    """Seeded minibatch training (batches of 64); Adam at ``lr`` unless an optimizer is given,
    ``schedule`` stepped per batch."""
    torch.manual_seed(seed)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[index]), targets[index]).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return model.eval()


@torch.no_grad()
def top1(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    return (model(inputs).argmax(1) == targets).float().mean().item()


def batches_of(inputs: torch.Tensor, targets: torch.Tensor | None, batch_size: int = 64):
    """A BatchSource over in-memory tensors, in order (tests want determinism)."""

    def source():
        for start in range(0, len(inputs), batch_size):
            yield inputs[start : start + batch_size], None if targets is None else targets[start : start + batch_size]

    return source
