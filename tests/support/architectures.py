"""Networks no builder knows, one per structure that channel pruning has to follow through a graph.

Each takes digits-shaped inputs ([N, 1, 8, 8]) and returns 10 logits, so the same fixtures and
data serve all of them. They are what issue 11's test set names: a residual ``add``, a
DenseNet-style ``cat``, depthwise-separable convolutions with squeeze-and-excitation, grouped
convolutions, a head whose ``Linear.in_features`` follows pruned channels through ``flatten``,
and a small attention block (its head count and ``reshape`` constants depend on channels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ResidualNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)
        )
        self.norm = nn.BatchNorm2d(width)
        self.down = _conv_bn(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.norm(x + self.body(x)))
        x = self.down(x)
        return self.head(x.mean(dim=(2, 3)))


class DenseNet(nn.Module):
    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 2 * width)
        self.grow1 = _conv_bn(2 * width, width)
        self.grow2 = _conv_bn(3 * width, width)
        self.transition = _conv_bn(4 * width, 2 * width, kernel=1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.grow1(x)], dim=1)
        x = torch.cat([x, self.grow2(x)], dim=1)
        x = F.avg_pool2d(self.transition(x), 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(scale))))


class SeparableSENet(nn.Module):
    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.depthwise = _conv_bn(width, width, groups=width)
        self.se = SqueezeExcite(width, width // 4)
        self.pointwise = _conv_bn(width, 2 * width, kernel=1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.se(self.depthwise(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class GroupedNet(nn.Module):
    def __init__(self, width: int = 32, groups: int = 4) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.grouped = _conv_bn(width, width, groups=groups)
        self.mix = _conv_bn(width, width, kernel=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.grouped(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlattenHeadNet(nn.Module):
    """No global pooling: the head reads channels × 4 × 4 positions, so its in_features follow the channels."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, width), _conv_bn(width, width), nn.MaxPool2d(2))
        self.hidden = nn.Linear(width * 16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(torch.flatten(self.features(x), 1))))


class AttentionNet(nn.Module):
    """A convolutional stem, then one multi-head self-attention block over the 16 positions."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.stem = nn.Sequential(_conv_bn(1, width), nn.MaxPool2d(2))
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # [N, 16, C]
        n, length, channels = tokens.shape
        qkv = self.qkv(tokens).reshape(n, length, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = torch.softmax(q @ k.transpose(-2, -1) * (channels // self.heads) ** -0.5, dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(n, length, channels)
        tokens = self.norm(tokens + self.proj(mixed))
        return self.head(tokens.mean(dim=1))


CUSTOM_ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "residual_add": ResidualNet,
    "dense_cat": DenseNet,
    "separable_se": SeparableSENet,
    "grouped": GroupedNet,
    "flatten_head": FlattenHeadNet,
    "attention": AttentionNet,
}


def build_custom(name: str, seed: int = 0) -> nn.Module:
    """A seeded instance in eval mode, its BatchNorm statistics made non-trivial by one pass of data."""
    torch.manual_seed(seed)
    model = CUSTOM_ARCHITECTURES[name]()
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8))
    return model.eval()


class DataDependentLoop(nn.Module):
    """A scripted ``while`` on a tensor's value: TorchScript runs it, torch.export cannot express it
    (TS2EPConverter stops at ``prim::Loop``), so it stays a program and cannot lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _conv_bn(1, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        steps = 0
        while bool(y.abs().mean() > 4.0) and steps < 3:
            y = y * 0.5
            steps += 1
        return self.head(y.mean(dim=(2, 3)))
