"""The op allowlist against torch's own operator registry: every overload of every allowed op is harmless.

An allowlist entry allows every overload of that op (graph checks compare node
kinds, which carry no overload name), so each overload's schema is checked:
no file names or paths, no Storage/Capsule/torchbind/RRef/Future arguments,
no distributed or profiler namespaces, no name that suggests I/O. And no junk:
every entry is a registered operator or one of the schema-less prim node kinds
listed here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from compactor.errors import UnsafeModel
from compactor.graph_ops import ALLOWED_OPS, check_ops, disallowed_ops

# Node kinds the TorchScript IR uses that have no operator schema (structure, control flow, calls).
PRIM_NODE_KINDS_WITHOUT_SCHEMA = frozenset(
    {
        "prim::Constant",
        "prim::GetAttr",
        "prim::SetAttr",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::TupleConstruct",
        "prim::DictConstruct",
        "prim::If",
        "prim::Loop",
        "prim::CallMethod",
        "prim::CallFunction",
        "prim::CreateObject",
        "prim::Enter",
        "prim::Exit",
        "prim::isinstance",
        "prim::fork",
    }
)

# Every `str` (or `str?`, `str[]`) argument of an allowed op, by name: none of them is a path.
KNOWN_STR_ARGUMENTS = frozenset(
    {
        # Options of tensor ops.
        "rounding_mode",  # div: "trunc" | "floor"
        "approximate",  # gelu: "none" | "tanh"
        "equation",  # einsum
        "mode",  # pad / __interpolate / linalg_qr modes
        "padding",  # conv: "same" | "valid"
        "reduce",  # scatter / index_reduce: "sum" | "prod" | "mean" | "amax" | "amin"
        "indexing",  # meshgrid: "ij" | "xy"
        "interpolation",  # quantile: "linear" | ...
        "side",  # searchsorted: "left" | "right"
        "norm",  # fft normalization: "forward" | "backward" | "ortho"
        "pad_mode",  # stft
        "ord",  # linalg_norm / linalg_matrix_norm: "fro" | "nuc"
        "UPLO",  # linalg_eigh: "L" | "U"
        "driver",  # linalg_svd: LAPACK driver choice
        "assert_msg",  # _assert_async / _assert_scalar: the message of a failed check
        "type",  # aten::device(str type): "cpu" | "cuda" | ...
        # Python string, list and dict helpers (aten::format, aten::add.str, aten::__getitem__.str, ...):
        # string values a program computes with, never opened.
        "self",
        "a",
        "b",
        "s",
        "string",
        "t",
        "input",
        "values",
        "el",
        "key",
        "item",
        "idx",
        "substr",
        "separator",
        "chars",
        "fillchar",
        "old",
        "new",
        "message",  # aten::warn
        "msg",  # prim::RaiseException
        "cls",  # prim::RaiseException: the exception class name
        # Lists and dicts whose elements or keys are strings (`"k" in d`, d["k"] = v, dict(pairs), d.update(other)).
        "l",
        "dict",
        "inputs",
        "to_add",
    }
)
PATH_LIKE = re.compile(r"file|path|dir|url|name|root|storage", re.IGNORECASE)
FORBIDDEN_IN_NAME = re.compile(r"file|save|load|pickle|socket|rpc|process|spawn|system|exec|print|getenv", re.IGNORECASE)
FORBIDDEN_NAMESPACE = re.compile(r"^(rpc|c10d|_c10d.*|dist.*|_dist.*|profiler|symm_mem|_distributed.*)$")
# `Any` is how the registry types the structural prim ops; nowhere else.
ANY_TYPE_ALLOWED = frozenset(
    {
        "prim::TupleIndex",
        "prim::TupleUnpack",
        "prim::Uninitialized",
        "aten::len",  # len.any(Any[] a): the length of a list
    }
)
FUTURE_TYPE_ALLOWED = frozenset({"aten::wait"})  # waits on a prim::fork task


def _schemas_by_name() -> dict[str, list[torch._C.FunctionSchema]]:
    by_name: dict[str, list[torch._C.FunctionSchema]] = defaultdict(list)
    for schema in torch._C._jit_get_all_schemas():
        by_name[schema.name].append(schema)
    return by_name


SCHEMAS = _schemas_by_name()


def test_every_allowed_op_is_registered_or_a_known_node_kind() -> None:
    junk = sorted(name for name in ALLOWED_OPS if name not in SCHEMAS and name not in PRIM_NODE_KINDS_WITHOUT_SCHEMA)
    assert junk == [], f"allowlist entries that name no operator: {junk}"
    # And the schema-less list above names no registered op (it would bypass the schema checks).
    assert sorted(PRIM_NODE_KINDS_WITHOUT_SCHEMA & SCHEMAS.keys()) == []


def test_allowed_op_names_and_namespaces() -> None:
    problems = []
    for name in sorted(ALLOWED_OPS):
        namespace, _, op = name.partition("::")
        if namespace not in ("aten", "prim"):
            problems.append(f"{name}: namespace {namespace!r}")
        if FORBIDDEN_NAMESPACE.match(namespace):
            problems.append(f"{name}: forbidden namespace")
        if FORBIDDEN_IN_NAME.search(op):
            problems.append(f"{name}: I/O-like name")
    assert problems == []


def _type_problems(name: str, schema: torch._C.FunctionSchema) -> list[str]:
    """What is wrong with one overload's argument and return types.

    Allowed besides tensors, scalars and their lists: Device (where a tensor lives), Generator (an
    RNG state in memory, for dropout and random ops), Layout, ScalarType, MemoryFormat, and enum
    values (the ``.enum`` overloads of comparisons).
    """
    problems = []
    for role, values in (("argument", schema.arguments), ("return", schema.returns)):
        for value in values:
            type_str = str(value.type)
            where = f"{schema.name}.{schema.overload_name or 'default'} {role} {value.name or '?'}: {type_str}"
            if re.search(r"Storage|Capsule|__torch__|RRef|Stream|Await|AnyClassType|QScheme", type_str):
                problems.append(where)
            if "Future" in type_str and name not in FUTURE_TYPE_ALLOWED:
                problems.append(where)
            if re.search(r"\bAny\b", type_str) and name not in ANY_TYPE_ALLOWED:
                problems.append(where)
            if role == "argument" and re.search(r"\bstr\b", type_str):
                if PATH_LIKE.search(value.name):
                    problems.append(f"{where} (path-like name)")
                if value.name not in KNOWN_STR_ARGUMENTS:
                    problems.append(f"{where} (unknown str argument)")
    return problems


def test_every_overload_of_every_allowed_op_is_harmless() -> None:
    problems = []
    for name in sorted(ALLOWED_OPS & SCHEMAS.keys()):
        for schema in SCHEMAS[name]:
            problems.extend(_type_problems(name, schema))
    assert problems == []


def test_the_known_dangerous_ops_are_refused() -> None:
    """Ops that read or write files, print, or leave the process, which the allowlist must never grow to include."""
    dangerous = [
        "aten::from_file",
        "aten::save",
        "aten::_print",
        "aten::set_",
        "prim::Print",
        "prim::PythonOp",
        "prim::rpc_async",
        "prim::awaitable",
        "debugprims::load_tensor",
        "profiler::_record_function_enter",
        "c10d::allreduce_",
        "quantized::linear",
        "aten::_get_cpu_capability",
    ]
    assert disallowed_ops(dangerous) == sorted(dangerous)
    # The registry still has them, so the names above are real, not typos.
    assert [name for name in dangerous if name not in SCHEMAS and name != "prim::awaitable"] == []


def test_check_ops_names_the_op_and_where_it_is() -> None:
    with pytest.raises(UnsafeModel) as caught:
        check_ops({"aten::conv2d": "forward", "aten::from_file": "forward of features.0"})
    error = caught.value
    assert error.code == "unsafe_model"
    assert error.message.startswith(
        "the model calls aten::from_file (in forward of features.0), which is not on the allowlist of pure tensor operations"
    )
    assert "state_dict" in error.message and "spec.model.arch" in error.message


def test_check_ops_counts_the_other_refused_ops() -> None:
    with pytest.raises(UnsafeModel) as caught:
        check_ops({"aten::save": "a", "aten::from_file": "b", "prim::Print": "c", "aten::relu": "d"})
    assert caught.value.message.startswith("the model calls aten::from_file (in b)")
    assert "and 2 other disallowed ops: aten::save, prim::Print" in caught.value.message


def test_check_ops_accepts_allowed_ops() -> None:
    check_ops({"aten::conv2d": "forward", "prim::If": "forward", "aten::add": "forward"})
    check_ops({})
    assert disallowed_ops(["aten::conv2d", "aten::conv2d", "aten::zzz", "aten::aaa"]) == ["aten::aaa", "aten::zzz"]


def test_graph_ops_imports_no_torch() -> None:
    code = "import sys, compactor.graph_ops, compactor.torchscript_code; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
