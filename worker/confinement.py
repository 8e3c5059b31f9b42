"""Kernel confinement for the process that runs an uploaded TorchScript program.

A TorchScript archive is code: its ops run with the rights of whatever process
calls the model. The op allowlist (``compactor.graph_ops``) refuses the known
ways a graph touches the outside world; this module is the second, independent
layer that holds when the allowlist misses something (a new op, a kernel bug
reached through a pure op). :func:`confine` turns the calling process — a
single-threaded child forked for one job — into one that can:

* read only the Python installation, the installed packages, the compression
  core's own source, shared system libraries, a few device and ``/proc`` files,
  and its own job's input files;
* write only its own scratch directory (the attempt directory of the job);
* not reach any network (a fresh network namespace *and* no sockets at all);
* not start processes or programs (threads only), trace or signal processes
  outside itself, mount, load kernel code or raise privileges;
* not exceed its memory, CPU-time and file-size limits, and not dump core.

What it uses, and why each:

* **Landlock** (ctypes, ABI ≥ 1; net rules from ABI 4, signal and abstract-socket
  scoping from ABI 6): unprivileged, path-based and stackable — the only
  filesystem restriction that needs no mount namespace, no root and no
  container runtime, and that also binds root. ``REFER`` is handled and never
  granted, so nothing can be linked or moved into the scratch directory from
  outside.
* **A network namespace** (``unshare(CLONE_NEWNET)``, inside a user namespace
  when the worker is not root): no interface but a loopback that is down. Where
  it cannot be created (a container without CAP_SYS_ADMIN) the child goes on
  without it: the seccomp filter's no-socket rule alone already cuts it off.
* **seccomp** (a hand-written BPF filter, x86_64): ``socket``/``socketpair``
  fail (also closing the gap Landlock leaves for named Unix sockets), as do
  ``execve``, ``fork`` and non-thread ``clone`` (which bounds the process count
  at one), ``ptrace``, ``process_vm_*``, mounts, namespaces, ``bpf``, module
  loading, ``io_uring``, ``userfaultfd`` and keyrings. ``clone3`` answers
  ENOSYS, so the C library falls back to ``clone``, whose flags the filter can
  read.
* **Capabilities and securebits**: the worker usually runs as root, and the
  Python installation here lives under ``/root`` (mode 0700), so switching to an
  unprivileged uid would make the interpreter unreadable. The child keeps
  uid 0 but drops every capability (bounding, effective, permitted,
  inheritable, ambient) and locks the securebits, so it can never regain them;
  with ``no_new_privs`` nothing it could execute gains any either.
* **setrlimit**: address space, CPU seconds, file size and no core dumps.

The environment handed to the child is scrubbed of everything but the
interpreter and thread-pool settings (``scrubbed_environment``): the worker's
API keys, store URLs and webhook secrets never reach it.

``confine`` raises :class:`ConfinementError` when any layer cannot be put in
place; the caller then reports the job as failing, never runs it unconfined.
:func:`self_test` (run once per worker, in a child) proves on the running
kernel that each layer holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import resource
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- syscalls

_MACHINE = platform.machine()
_X86_64 = _MACHINE in ("x86_64", "AMD64")

# Landlock's syscall numbers are the same on every architecture (the unified table).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_CAPSET = 126 if _X86_64 else 91

_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# Filesystem access rights, by the ABI version that introduced them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Rights that apply to a regular file (a rule on a file may grant only these).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
# The scratch directory: files and directories, nothing else (no symlinks, sockets, fifos, devices).
SCRATCH = READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_TRUNCATE

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each with its lock; KEEP_CAPS locked off.
_SECUREBITS = 0b1110_1111

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class ConfinementError(RuntimeError):
    """A layer of confinement could not be put in place; the job must not run."""


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise ConfinementError(f"{what} failed: {os.strerror(code)} (errno {code})")
    return result


def _prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


# ----------------------------------------------------------------------------- landlock


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The running kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    result = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(result), 0)


def _landlock(read: Iterable[Path], read_files: Iterable[Path], write: Iterable[Path], devices: Iterable[Path], abi: int) -> None:
    handled_fs = _FS_BY_ABI.get(abi, _FS_BY_ABI[5])
    attr = _RulesetAttr(
        handled_access_fs=handled_fs,
        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    # Older kernels reject a larger struct with fields they do not know: pass only what they read.
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for paths, rights in (
            (read, READ),
            (read_files, FS_READ_FILE | FS_READ_DIR),
            (write, SCRATCH),
            (devices, FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV),
        ):
            for path in paths:
                _add_path_rule(ruleset, path, rights & handled_fs)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _add_path_rule(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # optional paths (/lib64, /dev/nvidia0 ...) may be absent on this host
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _check(
            _libc.syscall(
                _SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- seccomp

# x86_64 syscall numbers refused with EPERM (EACCES for sockets, ENOSYS for clone3).
_X86_64_DENIED = {
    "socket": 41,
    "socketpair": 53,
    "execve": 59,
    "execveat": 322,
    "fork": 57,
    "vfork": 58,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "bpf": 321,
    "perf_event_open": 298,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "mknod": 133,
    "mknodat": 259,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "syslog": 103,
    "acct": 163,
    "quotactl": 179,
    "fanotify_init": 300,
    "personality": 135,
}
_X86_64_CLONE = 56
_X86_64_CLONE3 = 435
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def _seccomp_program() -> bytes:
    if not _X86_64:
        raise ConfinementError(f"the seccomp filter is written for x86_64; this machine is {_MACHINE}")
    program = [
        _bpf(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _bpf(_BPF_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _bpf(_BPF_RET_K, 0, 0, _RET_KILL_PROCESS),
        _bpf(_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        _bpf(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT),  # the x32 ABI would bypass every number below
        _bpf(_BPF_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    for name, number in _X86_64_DENIED.items():
        error = errno.EACCES if name in ("socket", "socketpair") else errno.EPERM
        program += [_bpf(_BPF_JEQ_K, 0, 1, number), _bpf(_BPF_RET_K, 0, 0, _RET_ERRNO | error)]
    program += [
        _bpf(_BPF_JEQ_K, 0, 1, _X86_64_CLONE3),
        _bpf(_BPF_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        _bpf(_BPF_JEQ_K, 0, 4, _X86_64_CLONE),
        _bpf(_BPF_LD_W_ABS, 0, 0, 16),  # low half of args[0]: the clone flags
        _bpf(_BPF_JSET_K, 1, 0, _CLONE_THREAD),
        _bpf(_BPF_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),  # a new process
        _bpf(_BPF_RET_K, 0, 0, _RET_ALLOW),  # a new thread
        _bpf(_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp() -> None:
    program = _seccomp_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len=len(program) // 8, filter=ctypes.cast(buffer, ctypes.c_void_p))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), what="seccomp filter")


# ----------------------------------------------------------------------------- capabilities, namespaces


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    if os.geteuid() == 0 or _capabilities_effective() != 0:
        _prctl(_PR_SET_SECUREBITS, _SECUREBITS, what="locking the securebits")
        for cap in range(last_cap + 1):
            _prctl(_PR_CAPBSET_DROP, cap, what=f"dropping capability {cap} from the bounding set")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="clearing ambient capabilities")
    header = _CapHeader(version=0x20080522, pid=0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def _capabilities_effective() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return -1


def _new_network_namespace() -> None:
    flags = _CLONE_NEWNET if os.geteuid() == 0 else (_CLONE_NEWUSER | _CLONE_NEWNET)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare(CLONE_NEWNET)")


def _thread_count() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def mapped_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- policy

# The only variables a job child keeps: the interpreter's and the thread pools' settings.
_KEPT_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_", "LC_")
_KEPT_ENV = {"PATH", "LANG", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "LD_LIBRARY_PATH", "VIRTUAL_ENV"}


def scrubbed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What of ``environ`` a process that runs uploaded code may see: no keys, URLs or secrets."""
    return {key: value for key, value in environ.items() if key in _KEPT_ENV or key.startswith(_KEPT_ENV_PREFIXES)}


def _read_roots() -> list[Path]:
    """What the interpreter and the core need to import and run: nothing of the data directory."""
    import compactor
    import worker

    roots = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.exec_prefix), Path(worker.__file__).parent, Path(compactor.__file__).parent}
    for entry in sys.path:
        # Installed packages only: a bare project directory on sys.path may hold the data directory.
        if entry and ("site-packages" in entry or "dist-packages" in entry):
            roots.add(Path(entry))
    roots.update(Path(p) for p in ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"))
    return sorted(root.resolve() for root in roots if root.exists())


_READ_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero", "/proc/cpuinfo", "/proc/meminfo")
_READ_DIRS_SYS = ("/sys/devices/system/cpu", "/sys/fs/cgroup")
_GPU_DIRS = ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices")


@dataclass(frozen=True)
class Policy:
    """What one confined job may touch, and its resource limits."""

    scratch: Path
    inputs: tuple[Path, ...] = ()
    address_space_bytes: int | None = None  # beyond what the child already maps; None: no limit
    cpu_seconds: int | None = None
    file_bytes: int | None = None
    gpu: bool = False


def apply_limits(policy: Policy) -> None:
    """The resource limits alone (every job child gets them, confined or not)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if policy.address_space_bytes is not None:
        limit = mapped_bytes() + policy.address_space_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if policy.cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (policy.cpu_seconds, policy.cpu_seconds + 5))
    if policy.file_bytes is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (policy.file_bytes, policy.file_bytes))


def check_data_dir_outside(data_dir: Path) -> None:
    """Refuse a layout where the read-only roots would expose the data directory."""
    data = data_dir.resolve()
    for root in _read_roots():
        if data == root or root in data.parents:
            raise ConfinementError(
                f"the data directory {data} lies inside {root}, which a confined job must be able to read; "
                "move COMPACTOR_DATA_DIR outside the Python installation and the installed packages"
            )


_confined = False


def is_confined() -> bool:
    """Whether :func:`confine` has put this process in its box (for good: it cannot be undone)."""
    return _confined


def confine(policy: Policy) -> None:
    """Confine the calling process for good (see the module docstring). Call it single-threaded."""
    if not sys.platform.startswith("linux"):
        raise ConfinementError("confinement needs Linux (Landlock, seccomp, namespaces)")
    if _thread_count() != 1:
        # Landlock and seccomp bind the calling thread and the threads it starts later, not its siblings.
        raise ConfinementError(f"confine() must run before any thread starts ({_thread_count()} threads)")
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementError("Landlock is not available in this kernel (needs Linux ≥ 5.13 with lsm=...,landlock)")
    # The child dies with its parent: nothing confined outlives the job that started it.
    _prctl(_PR_SET_PDEATHSIG, 9, what="PR_SET_PDEATHSIG")
    read_roots = _read_roots()
    devices: list[Path] = [Path("/dev/null")]
    if policy.gpu:
        devices += sorted(Path("/dev").glob("nvidia*"))
        read_roots += [Path(p) for p in _GPU_DIRS]
    apply_limits(policy)
    # Belt and braces only: the seccomp filter below refuses every socket anyway. Containers
    # without CAP_SYS_ADMIN (Docker's default) cannot create the namespace.
    with contextlib.suppress(ConfinementError):
        _new_network_namespace()
    _drop_capabilities()
    if _capabilities_effective() != 0:
        raise ConfinementError("capabilities are still effective after dropping them")
    read_files = [Path(p) for p in _READ_FILES] + [Path(p) for p in _READ_DIRS_SYS] + list(policy.inputs) + [Path("/proc/self")]
    # /proc/self is resolved now, to this process's own directory, and only that one.
    _landlock(read_roots, read_files, [policy.scratch], devices, abi)
    _seccomp()
    sys.dont_write_bytecode = True
    kept = scrubbed_environment(os.environ)
    os.environ.clear()
    os.environ.update(kept)
    os.environ["TMPDIR"] = str(policy.scratch)
    os.environ["HOME"] = str(policy.scratch)
    import tempfile

    tempfile.tempdir = str(policy.scratch)
    global _confined
    _confined = True


__all__ = [
    "ConfinementError",
    "Policy",
    "apply_limits",
    "check_data_dir_outside",
    "confine",
    "is_confined",
    "landlock_abi",
    "mapped_bytes",
    "scrubbed_environment",
]
