"""Open an untrusted TorchScript archive in a throwaway child process first.

TorchScript has no safe loading mode, and a crafted archive can crash the
loader (a segfault takes the whole worker with it) or exhaust memory. Before
the worker loads an upload itself, a child process with an address-space limit,
no core dumps and a time limit loads it; if the child dies, runs out of memory
or time, or raises, the job fails with ``invalid_model`` and the worker lives on
to take the next job.

Children are forked from a fork server that imported torch once (multiprocessing
"forkserver" with torch preloaded), so a probe costs a fork, not a new
interpreter importing torch (~3.5 s on two cores). The fork server never touches
CUDA and neither do the children (``map_location="cpu"``).
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from compactor.errors import InvalidModel

# Room for the archive's tensors and their copies while loading, above what the child
# already maps (torch itself, inherited from the fork server).
LOAD_HEADROOM_BYTES = 1024**3

_context_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["worker.sandbox_server", "torch"])
            _context = context
        return _context


def start_fork_server() -> None:
    """Start the fork server now, at worker start-up, instead of at the first TorchScript job.

    It imports torch (~1.5-3 s) in its own process while the worker loads the core, so the
    first job's probe is a fork like every later one (that job used to wait for the import)."""
    import multiprocessing.forkserver

    _forkserver()
    multiprocessing.forkserver.ensure_running()


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _load_in_child(path: str, extra_bytes: int, results: Connection) -> None:
    # Soft limit only: the child lifts it again to report a failure (sending needs memory too).
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_mapped_bytes() + extra_bytes, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        import torch

        torch.jit.load(path, map_location="cpu")
    except BaseException as exc:  # noqa: BLE001 - everything is reported, nothing escapes
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        text = str(exc).strip()
        results.send(f"{type(exc).__name__}: {text.splitlines()[-1][:300] if text else ''}")
        raise SystemExit(1) from None
    results.send("loaded")


def address_space_for(path: Path) -> int:
    """Extra address space a child may map to load ``path``."""
    return LOAD_HEADROOM_BYTES + 4 * path.stat().st_size


def probe_torchscript(path: Path, *, timeout_seconds: float, address_space_bytes: int | None = None) -> None:
    """Raise InvalidModel unless a limited child process can load ``path`` with torch.jit.load.

    ``address_space_bytes`` is what the child may map beyond what it inherits.
    """
    extra = address_space_bytes if address_space_bytes is not None else address_space_for(path)
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_load_in_child, args=(str(path), extra, send), daemon=True)
    child.start()
    send.close()
    child.join(timeout_seconds)
    if child.is_alive():
        child.kill()
        child.join()
        raise InvalidModel(
            f"loading the TorchScript archive took longer than {timeout_seconds:.0f} s and was stopped; "
            "re-export it with torch.jit.save, or upload a state_dict with spec.model.arch"
        )
    try:
        message = receive.recv() if receive.poll() else ""
    except (EOFError, OSError):  # the child died before it could say why
        message = ""
    receive.close()
    if child.exitcode == 0 and message == "loaded":
        return
    if child.exitcode is not None and child.exitcode < 0:
        reason = f"the loader crashed ({signal.Signals(-child.exitcode).name})"
    elif "MemoryError" in message or "bad_alloc" in message:
        reason = f"loading it needs more than {extra / 2**30:.1f} GiB of memory"
    else:
        reason = f"torch.jit.load failed: {message or 'no message'}"
    raise InvalidModel(
        f"the TorchScript archive cannot be loaded safely: {reason}. "
        "Re-export it with torch.jit.save, or upload a state_dict with spec.model.arch"
    )
