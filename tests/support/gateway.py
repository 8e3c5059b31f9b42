"""The gateway side of the tests: API keys, small real upload files, uvicorn in a thread."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import uvicorn
from torch import nn

from compactor.queue import broker_folders
from compactor.settings import Settings

ALICE = "alice-key-0123456789"
BOB = "bob-key-9876543210"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@dataclass(frozen=True)
class Files:
    torchscript: bytes
    state_dict: bytes
    pt2: bytes
    unsafe: bytes
    dataset_pt: bytes
    dataset_npz: bytes
    dataset_npz_unlabeled: bytes
    not_a_model: bytes


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def make_files() -> Files:
    torch.manual_seed(0)
    model = Tiny().eval()
    ts = io.BytesIO()
    torch.jit.save(torch.jit.script(model), ts)
    inputs = torch.rand(12, 1, 8, 8)
    targets = torch.randint(0, 10, (12,))
    pt2 = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (inputs[:2],), dynamic_shapes={"x": {0: batch}}), pt2)
    npz, npz_unlabeled = io.BytesIO(), io.BytesIO()
    np.savez(npz, inputs=inputs.numpy(), targets=targets.numpy())
    np.savez(npz_unlabeled, inputs=inputs.numpy()[:7])
    return Files(
        torchscript=ts.getvalue(),
        state_dict=_saved(model.state_dict()),
        pt2=pt2.getvalue(),
        unsafe=_saved(model),  # unsafe-on-purpose: a whole pickled nn.Module
        dataset_pt=_saved({"inputs": inputs, "targets": targets}),
        dataset_npz=npz.getvalue(),
        dataset_npz_unlabeled=npz_unlabeled.getvalue(),
        not_a_model=b"GIF89a this is not a model at all" * 10,
    )


def gateway_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"data_dir": data_dir, "api_keys": f"alice:{ALICE},bob:{BOB}"}
    values.update(overrides)
    return Settings.model_validate(values)


def broker_messages(settings: Settings) -> list[Path]:
    return sorted(broker_folders(settings)["messages"].glob("*.msg"))


def stored_files(settings: Settings) -> list[Path]:
    """Every upload file and temporary file the storage holds."""
    root = settings.resolved_data_dir
    return [p for sub in ("uploads", "tmp") if (root / sub).exists() for p in (root / sub).iterdir()]


def zip_names(data: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(data)).namelist()


@contextmanager
def uvicorn_in_thread(app: object) -> Iterator[str]:
    """``app`` served by a real uvicorn (lifespan on) on a free loopback port, in a thread; yields
    its base URL and stops it afterwards."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
