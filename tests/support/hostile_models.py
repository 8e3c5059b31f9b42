"""Scripted classifiers that behave normally except for one hostile or broken trait.

Each returns logits [batch, 10] for digits-shaped input [N, 1, 8, 8], so that the
pipeline's own checks would accept it: only the op allowlist and the kernel
confinement stand between it and the worker.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def reads_file(path: Path, size: int) -> nn.Module:
    """Maps ``path`` privately and copies its bytes into a buffer (which lands in the artifacts)."""

    class ReadsFile(_Head):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("loot", torch.zeros(size, dtype=torch.uint8))
            self.path = str(path)
            self.size = size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stolen = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
            self.loot.copy_(stolen)
            return self.logits(x) + self.loot.float().sum() * 0.0

    return torch.jit.script(ReadsFile().eval())


def overwrites_file(path: Path, size: int) -> nn.Module:
    """Maps ``path`` shared (or creates it, when missing) and fills it with 'A's."""

    class OverwritesFile(_Head):
        def __init__(self) -> None:
            super().__init__()
            self.path = str(path)
            self.size = size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mapped = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
            mapped.fill_(65)
            # Used in the output, or TorchScript's dead-code pass drops the call altogether.
            return self.logits(x) + mapped.float().sum() * 0.0

    return torch.jit.script(OverwritesFile().eval())


def never_returns() -> nn.Module:
    """A forward pass that spins for hours in pure tensor ops (a stuck library call, as far as
    the worker can tell)."""

    class NeverReturns(_Head):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            for _ in range(1_000_000_000_000):
                y = y * 1.0
            return self.logits(y)

    return torch.jit.script(NeverReturns().eval())


def slow_to_load() -> nn.Module:
    """Its ``__setstate__``, which ``torch.jit.load`` runs, spins for hours: a loader that hangs."""

    class SlowToLoad(_Head):
        def __init__(self) -> None:
            super().__init__()
            self.spins = 1_000_000_000_000

        @torch.jit.export
        def __getstate__(self) -> tuple[int, bool]:
            return (self.spins, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[int, bool]) -> None:
            total = 0.0
            for _ in range(state[0]):
                total = total + 1.0
            self.spins = state[0]
            self.training = state[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits(x)

    return torch.jit.script(SlowToLoad().eval())


def eats_memory() -> nn.Module:
    """Allocates 64 MiB blocks until something gives."""

    class EatsMemory(_Head):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            blocks: list[torch.Tensor] = []
            total = torch.zeros(1)
            for i in range(4096):
                # A fill value that varies, or constant propagation folds the loop into one tensor.
                blocks.append(torch.full([1 << 24], float(i)))
                total = total + blocks[i][i]
            return self.logits(x) + total * 0.0

    return torch.jit.script(EatsMemory().eval())


def attack_targets(directory: Path, secret: bytes) -> dict[str, Path]:
    """Outside any data directory: a secret to steal, a victim to overwrite, a path to plant a file at."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret.txt").write_bytes(secret)
    (directory / "victim.bin").write_bytes(b"victim-bytes-" * 8)
    return {"secret": directory / "secret.txt", "victim": directory / "victim.bin", "new": directory / "planted.py"}


def attacks(targets: dict[str, Path], secret_size: int, other_upload: Path) -> dict[str, nn.Module]:
    """The issue's three attacks, plus reading another tenant's upload inside the data directory."""
    return {
        "read a secret outside the data dir": reads_file(targets["secret"], secret_size),
        "read another tenant's upload": reads_file(other_upload, 16),
        "overwrite a victim file": overwrites_file(targets["victim"], 16),
        "create a new file": overwrites_file(targets["new"], 16),
    }


def save(module: nn.Module, path: Path) -> Path:
    torch.jit.save(module, str(path))
    return path
