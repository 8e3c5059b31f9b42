"""Open an untrusted TorchScript archive in a throwaway child process first.

TorchScript has no safe loading mode, and a crafted archive can crash the
loader (a segfault takes the whole worker with it) or exhaust memory. Before
the worker loads an upload itself, a child process with an address-space limit,
no core dumps, no GPU and a time limit loads it; if the child dies, runs out of
memory or time, or raises, the job fails with ``invalid_model`` and the worker
lives on to take the next job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from compactor.errors import InvalidModel

# torch itself (CUDA build) needs ~3 GiB of address space just to import.
BASE_ADDRESS_SPACE = 4 * 1024**3

_CHILD = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import torch
torch.jit.load(sys.argv[1], map_location="cpu")
print("loaded", flush=True)
"""


def address_space_for(path: Path) -> int:
    """Room for torch, the archive's tensors and their copies while loading."""
    return BASE_ADDRESS_SPACE + 4 * path.stat().st_size


def probe_torchscript(path: Path, *, timeout_seconds: float, address_space_bytes: int | None = None) -> None:
    """Raise InvalidModel unless a limited child process can load ``path`` with torch.jit.load."""
    limit = address_space_bytes or address_space_for(path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD, str(path), str(limit)],
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise InvalidModel(
            f"loading the TorchScript archive took longer than {timeout_seconds:.0f} s and was stopped; "
            "re-export it with torch.jit.save, or upload a state_dict with spec.model.arch"
        ) from None
    if done.returncode == 0 and "loaded" in done.stdout:
        return
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        reason = f"the loader crashed ({name})"
    elif "MemoryError" in done.stderr or "std::bad_alloc" in done.stderr:
        reason = f"loading it needs more than {limit / 2**30:.1f} GiB of memory"
    else:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = f"torch.jit.load failed: {last[-1][:300] if last else 'no message'}"
    raise InvalidModel(
        f"the TorchScript archive cannot be loaded safely: {reason}. "
        "Re-export it with torch.jit.save, or upload a state_dict with spec.model.arch"
    )
