"""Process-tree supervision for ``compactor serve``: one gateway, N workers, one exit.

The supervisor is a plain parent process (no torch, no CUDA, no threads of its
own at spawn time) that starts each child with ``subprocess.Popen`` — a fresh
interpreter via fork+exec, so nothing a child imports can leak into another.

- A child that dies unexpectedly: a worker is restarted with backoff (a job that
  ignored its hard time limit ends its worker on purpose); the gateway is not —
  without it the service is down, so the whole tree stops and exits non-zero.
- SIGINT / SIGTERM to the supervisor: every child gets SIGTERM (workers hand
  their running job back at the next batch; uvicorn drains), then up to
  ``stop_timeout`` seconds to exit, then SIGKILL for stragglers. Exit status 0.
- The supervisor itself SIGKILLed: each child asked the kernel for SIGTERM when
  its parent dies (``bind_to_parent``, Linux ``PR_SET_PDEATHSIG``), so no
  orphans keep the port or the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

# Set in each child's environment: the pid it must outlive no longer than.
SUPERVISOR_PID_ENV = "COMPACTOR_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1

RESTART_BACKOFF_START = 1.0
RESTART_BACKOFF_MAX = 30.0
# A child that ran this long before dying is treated as healthy: its backoff starts over.
HEALTHY_AFTER_SECONDS = 60.0


def bind_to_parent() -> None:
    """In a child of the supervisor: receive SIGTERM when the supervisor dies.

    Called first thing by ``compactor gateway`` / ``compactor worker`` when
    ``COMPACTOR_SUPERVISOR_PID`` is set. Linux only; elsewhere a no-op."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as exc:  # pragma: no cover - exotic libc
        log.warning("cannot ask to be stopped with the supervisor: %s", exc)
        return
    # The supervisor may have died before prctl took effect: then nobody would signal us.
    if str(os.getppid()) != expected:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    # Workers are restarted when they die; the gateway's death stops the tree.
    restart: bool = True


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = RESTART_BACKOFF_START
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    specs: Sequence[ChildSpec]
    stop_timeout: float = 30.0
    poll_interval: float = 0.2
    _children: list[_Child] = field(default_factory=list)
    _stop_signal: int | None = None

    # -- public

    def run(self) -> int:
        """Start every child, supervise until told to stop or the gateway dies; the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._children = [_Child(spec) for spec in self.specs]
            for child in self._children:
                if self._stop_signal is None:
                    self._spawn(child)
            status = self._supervise()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def pids(self) -> dict[str, int]:
        return {child.spec.name: child.process.pid for child in self._children if child.process is not None and child.process.poll() is None}

    def stop(self) -> None:
        """SIGTERM every live child, wait up to ``stop_timeout``, SIGKILL what remains."""
        live = [child.process for child in self._children if child.process is not None and child.process.poll() is None]
        for process in live:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in live:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0fs; killing it", process.pid, self.stop_timeout)
                _signal(process, signal.SIGKILL)
                process.wait()

    # -- internals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only note it: the loop below does the stopping outside the signal handler.
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        # A method, not the attribute: the signal handler sets it between any two statements.
        return self._stop_signal is not None

    def _spawn(self, child: _Child) -> None:
        env = {**child.spec.env, SUPERVISOR_PID_ENV: str(os.getpid())}
        child.process = subprocess.Popen(list(child.spec.argv), env=env)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _supervise(self) -> int:
        while self._stop_signal is None:
            now = time.monotonic()
            for child in self._children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.restarts += 1
                        self._spawn(child)
                    continue
                if child.process is None:
                    continue
                code = child.process.poll()
                if code is None:
                    continue
                if self._stop_requested():
                    break  # a Ctrl-C reaches the children too; their exit is the stop, not a crash
                if not child.spec.restart:
                    log.error("%s exited with status %d; stopping the service", child.spec.name, code)
                    return 1
                if now - child.started_at >= HEALTHY_AFTER_SECONDS:
                    child.backoff = RESTART_BACKOFF_START
                log.warning(
                    "%s (pid %d) exited with status %d; restarting in %.0fs",
                    child.spec.name,
                    child.process.pid,
                    code,
                    child.backoff,
                )
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
            time.sleep(self.poll_interval)
        log.info("received %s; stopping", signal.Signals(self._stop_signal).name)
        return 0


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
