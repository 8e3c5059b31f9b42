"""Preloaded into the sandbox's fork server: it dies with the worker that started it.

Without this, a worker stopped by SIGTERM leaves its fork server behind as an
orphan (the supervisor promises that no child outlives the process tree).
"""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1

if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
