"""A model written as a user would upload it through each door: a state_dict (for model.arch), a
``torch.export`` archive, or traced / scripted TorchScript. The tests and the benchmarks use it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Door = Literal["state_dict", "pt2", "traced", "scripted"]
DOORS: tuple[Door, ...] = ("state_dict", "pt2", "traced", "scripted")


def write_upload(model: nn.Module, door: Door, directory: Path, example: torch.Tensor) -> Path:
    """The upload file of ``model`` through ``door`` in ``directory``. ``example`` is one batch of
    at least two samples (torch.export specialises a dimension whose example size is 1); the .pt2
    keeps the batch dynamic."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if door == "state_dict":
            path = directory / "weights.pt"
            torch.save(model.state_dict(), path)
        elif door == "pt2":
            path = directory / "model.pt2"
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), path)
        else:
            path = directory / "model.ts"
            torch.jit.save(torch.jit.trace(model, example) if door == "traced" else torch.jit.script(model), path)
    return path
