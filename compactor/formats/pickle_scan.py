"""Which globals a pickle would import, read from its opcodes: it is never unpickled.

The operands of ``STACK_GLOBAL`` are tracked through a small abstract stack and the memo;
every global must be in :data:`STATE_DICT_GLOBALS` for a file to count as plain tensors.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Iterable

# (module, name) pairs a plain state_dict or dict of tensors pickles, as
# torch 2.14.1 writes them (checked against its real output for every dtype).
# Protocol-2 pickles spell builtins as ``__builtin__``; both spellings listed.
_STORAGE_NAMES = (
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
)
_DTYPE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
)
STATE_DICT_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        # Used for dtypes without a legacy typed storage (uint16, float8, ...).
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "device"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("__builtin__", "set"),
    }
    | {("torch", name) for name in _STORAGE_NAMES}
    | {("torch", name) for name in _DTYPE_NAMES}
)

# Opcodes whose argument is a string that STACK_GLOBAL may consume.
_STRING_OPCODES = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})

_MARK = object()  # a MARK on the abstract stack
_UNKNOWN = object()  # any value whose content the scan does not track


class MalformedPickle(ValueError):
    """The bytes are not a well-formed pickle (truncated, bad opcode, stack underflow)."""


def pickle_globals(pickle_bytes: bytes) -> list[str]:
    """Every global a pickle would import, as ``"module.name"``, without unpickling it.

    Globals whose name cannot be determined statically (a ``STACK_GLOBAL`` fed
    by computed values) or that go through the copyreg extension registry are
    returned as ``"<...>"`` descriptions, which no allowlist contains.
    Raises :class:`MalformedPickle` on bytes that are not a complete pickle.
    """
    found: list[str] = []
    for module, name in _pickle_global_pairs(pickle_bytes):
        found.append(name if module == "" else f"{module}.{name}")
    return found


def _pickle_global_pairs(pickle_bytes: bytes) -> list[tuple[str, str]]:
    stack: list[object] = []
    memo: list[object] = []
    found: list[tuple[str, str]] = []
    stopped = False
    try:
        # genops stops at STOP; like the unpickler, it ignores any bytes after it.
        for opcode, arg, _position in pickletools.genops(pickle_bytes):
            name = opcode.name
            if name == "STOP":
                stopped = True
            if name in ("GLOBAL", "INST"):
                parts = str(arg).split(" ")
                # A module or name with a space would be ambiguous; no real global has one.
                found.append((parts[0], parts[1]) if len(parts) == 2 else ("", f"<global {arg!r}>"))
            elif name == "STACK_GLOBAL":
                if len(stack) < 2:
                    raise MalformedPickle("STACK_GLOBAL with fewer than two stack items")
                module, attribute = stack[-2], stack[-1]
                if isinstance(module, str) and isinstance(attribute, str):
                    found.append((module, attribute))
                else:
                    found.append(("", "<STACK_GLOBAL with computed operands>"))
            elif name in _EXTENSION_OPCODES:
                found.append(("", f"<copyreg extension code {arg}>"))

            _apply_stack_effect(opcode, arg, stack, memo)
    except MalformedPickle:
        raise
    except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as error:
        raise MalformedPickle(f"not a well-formed pickle: {error}") from error
    if not stopped:
        raise MalformedPickle("pickle ends without a STOP opcode (truncated)")
    return found


# Bounds on the scan's own memory (a 64 MiB pickle of one-byte pushes would otherwise hold
# 64 M stack items). Python's pickler batches containers 1,000 items at a time, so a real
# state_dict's stack stays a few thousand deep; it memoizes ~9 objects per tensor.
MAX_PICKLE_STACK_ITEMS = 100_000
MAX_PICKLE_MEMO_ITEMS = 4_000_000


def _apply_stack_effect(opcode: pickletools.OpcodeInfo, arg: object, stack: list[object], memo: list[object]) -> None:
    """Track the stack just closely enough to know which strings STACK_GLOBAL consumes."""
    name = opcode.name
    # The real unpickler cannot see past a MARK either: it fails where this does.
    if (name in _MEMO_PUT_OPCODES or name in ("MEMOIZE", "DUP")) and (not stack or stack[-1] is _MARK):
        raise MalformedPickle(f"{name} on an empty stack")
    if name in _MEMO_PUT_OPCODES or name == "MEMOIZE":
        key = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[call-overload]
        if key < len(memo):
            memo[key] = stack[-1]
            return
        # Picklers number memo entries 0, 1, 2, ...; a key far ahead makes C's unpickler
        # size its memo table to the key (PUT 2**28 costs the loader 4 GiB of memory).
        if key > len(memo):
            raise MalformedPickle(f"{name} of memo key {key} out of sequence (next key is {len(memo)})")
        if len(memo) >= MAX_PICKLE_MEMO_ITEMS:
            raise MalformedPickle(f"the pickle memoizes more than {MAX_PICKLE_MEMO_ITEMS} objects")
        memo.append(stack[-1])
        return
    if name in _MEMO_GET_OPCODES:
        key = int(arg)  # type: ignore[call-overload]
        if not 0 <= key < len(memo):
            raise MalformedPickle(f"{name} of memo key {key} that was never stored")
        stack.append(memo[key])
        return
    if name == "MARK":
        stack.append(_MARK)
        return
    if name == "DUP":
        stack.append(stack[-1])
        return

    before = opcode.stack_before
    if pickletools.markobject in before:
        # Pops everything down to and including the topmost MARK.
        while True:
            if not stack:
                raise MalformedPickle(f"{name} without a matching MARK")
            if stack.pop() is _MARK:
                break
        # Items below the mark that the opcode also consumes (the list of APPENDS, the dict of SETITEMS, ...).
        fixed_pops = before.index(pickletools.markobject)
        for _ in range(fixed_pops):
            if not stack or stack.pop() is _MARK:
                raise MalformedPickle(f"stack underflow at {name}")
    else:
        for _ in range(len(before)):
            if not stack:
                raise MalformedPickle(f"stack underflow at {name}")
            if stack.pop() is _MARK:
                raise MalformedPickle(f"{name} consumed a MARK")

    if len(stack) + len(opcode.stack_after) > MAX_PICKLE_STACK_ITEMS:
        raise MalformedPickle(f"the pickle's stack grows past {MAX_PICKLE_STACK_ITEMS} items")
    if name in _STRING_OPCODES:
        stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        return
    for _ in opcode.stack_after:
        stack.append(_UNKNOWN)


def disallowed_globals(pickle_bytes: bytes, allowed: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS) -> list[str]:
    """The globals of a pickle that are not in ``allowed``, in first-seen order, without duplicates."""
    out: list[str] = []
    for module, name in _pickle_global_pairs(pickle_bytes):
        if (module, name) in allowed:
            continue
        described = name if module == "" else f"{module}.{name}"
        if described not in out:
            out.append(described)
    return out


def describe_globals(names: Iterable[str], shown: int = 5) -> str:
    names = list(names)
    listed = ", ".join(f"'{name}'" for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{listed}{more}"
