"""A cheap scan of a TorchScript archive's code, before torch ever loads it.

Imports no torch: the gateway calls :func:`check_torchscript_code` at upload,
so that an archive which calls ``aten::from_file`` is refused with a clear
message before it is queued. It is an early, conservative filter, not the
authority: the worker walks the loaded graphs
(:mod:`worker.compression.graph_check`), inside the confined child, against
the same allowlist (:mod:`compactor.graph_ops`). The scan must never refuse
an archive that ``torch.jit.save`` wrote and the graph walker accepts; it may
let through things only the walker sees (interface calls, ``with`` blocks).

A TorchScript archive carries its program as Python-syntax source under
``<prefix>/code/`` (one ``.py`` file per module path of ``__torch__``), which
``torch.jit.load`` compiles. Loading alone already runs some of it (the
``__setstate__`` of every object in ``data.pkl``), which is why this scan
reads every code file, not only what ``forward`` reaches. The text is parsed
with :mod:`ast`, never executed, and every reference is resolved the way
TorchScript's source importer resolves names:

* ``torch.X`` is the builtin ``aten::X``; ``torch.autograd.X`` (any number of
  ``autograd``) too, and ``ops.NS.X`` is ``NS::X`` (``ops.NS.autograd.X`` is
  ``aten::X`` again). ``torch.ops.NS.X`` (not compilable in an archive) is
  read as ``NS::X``. ``getattr(a, "b")`` is read as ``a.b``. References count
  whether or not they are called, since the compiler lets a builtin be
  assigned to a variable (``f = torch.from_file; f(...)``); so does a bare
  ``torch``/``ops`` used as a value, which is reported as a pseudo-op.
* ``print`` is ``prim::Print``, ``fork`` ``prim::fork``, ``awaitable``
  ``prim::awaitable``. Other bare builtins (``annotate``, ``unchecked_cast``,
  ``uninitialized``, ``isinstance``, ``int``, ``len``, ...) compile to
  structural or scalar ops and are not reported here.
* ``__torch__.*`` names are the archive's own classes and functions, whose
  bodies are scanned in their own files; ``__torch__.torch.classes.*`` are
  C++ (torchbind) classes, reported wherever they appear, annotations too.
* ``x.NAME(...)`` where no class or function in the archive defines ``NAME``
  is a builtin method, i.e. ``aten::NAME`` (``prim::tolist`` for ``tolist``).
  ``torch.jit.save`` never prints builtins as methods, only calls to the
  archive's own methods (and to torchbind methods, which the walker refuses
  too), so this only catches hand-written code such as ``t = torch; t.save(...)``.

Type positions (annotations, the type argument of ``annotate``,
``unchecked_cast``, ``uninitialized``, ``isinstance``) are skipped, apart from
torchbind names.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compactor.errors import InvalidModel
from compactor.formats.limits import ArchiveLimits
from compactor.formats.zip_guard import check_zip_archive, open_zip, read_entry
from compactor.graph_ops import check_ops

_MIB = 1024**2

# Bare names the source importer and the TorchScript compiler turn into non-structural ops.
_BUILTIN_NAME_OPS = {"print": "prim::Print", "fork": "prim::fork", "awaitable": "prim::awaitable"}
# Builtin methods that do not compile to aten::<name>.
_METHOD_OPS = {"tolist": "prim::tolist"}
# Calls whose first (or every) argument is a type, not a value.
_TYPE_FIRST_ARGUMENT = frozenset({"annotate", "unchecked_cast"})
_TORCHBIND_PREFIX = ("__torch__", "torch", "classes")
# What the TorchScript printer never writes and no reader should try to interpret:
# control characters other than newline and tab (form feeds and lone carriage returns
# are where two tokenizers could disagree about what is code).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def torchscript_code_ops(path: Path, *, max_code_bytes: int = 64 * _MIB) -> dict[str, str]:
    """Every op the code of the TorchScript archive at ``path`` references, mapped to where it first appears.

    Where is ``"code/__torch__/foo.py: Foo.forward"`` (the entry relative to the
    archive's prefix, then the enclosing class and function). Raises
    :class:`InvalidModel` when the archive is not a readable zip, its code
    totals more than ``max_code_bytes``, or a code file does not parse.
    """
    path = Path(path)
    limits = ArchiveLimits()
    with open_zip(path, InvalidModel, limits) as archive:
        prefix = check_zip_archive(archive, limits, file_size=path.stat().st_size, single_prefix=True, error=InvalidModel)
        assert prefix is not None  # single_prefix=True: one top-level directory, or InvalidModel
        code_entries = [
            info for info in archive.infolist() if info.filename.startswith(f"{prefix}/code/") and info.filename.endswith(".py") and not info.is_dir()
        ]
        total = sum(info.file_size for info in code_entries)
        if total > max_code_bytes:
            raise InvalidModel(
                f"the TorchScript archive holds {total} bytes of code, above the limit of {max_code_bytes}; "
                "a model's code is normally well under a few MiB"
            )
        sources = {info.filename[len(prefix) + 1 :]: read_entry(archive, info.filename, max_code_bytes, InvalidModel) for info in code_entries}
    texts = {name: _decode(name, source) for name, source in sources.items()}
    trees = {name: _parse(name, text) for name, text in texts.items()}
    # Method names the archive defines: x.name(...) with one of these is its own method, not a builtin.
    defined = {
        statement.name for tree in trees.values() for statement in _statements(tree) if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    ops: dict[str, str] = {}
    for name in sorted(trees):
        may_shadow = any(builtin in texts[name] for builtin in _BUILTIN_NAME_OPS)
        _Scanner(name, defined, ops, may_shadow).scan(trees[name])
    return ops


def check_torchscript_code(path: Path) -> None:
    """Raise :class:`UnsafeModel` if the archive's code references an op outside the allowlist."""
    check_ops(torchscript_code_ops(path))


def _decode(name: str, source: bytes) -> str:
    try:
        return source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidModel(f"the archive's code cannot be read: {name} is not UTF-8 text ({exc.reason})") from exc


def _parse(name: str, text: str) -> ast.Module:
    control = _CONTROL_CHARACTERS.search(text)
    if control:
        raise InvalidModel(
            f"the archive's code cannot be read: {name} contains the control character {control.group()!r}, which torch.jit.save never writes"
        )
    try:
        return ast.parse(text, filename=name)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, SyntaxError) else type(exc).__name__
        raise InvalidModel(f"the archive's code cannot be read: {name} is not valid Python syntax ({detail})") from exc


def _statements(tree: ast.Module) -> Iterator[ast.stmt]:
    """Every statement, nested ones included (definitions are statements, never inside expressions)."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        statement = stack.pop()
        yield statement
        for name in ("body", "orelse", "finalbody"):
            stack.extend(getattr(statement, name, ()))
        for handler in getattr(statement, "handlers", ()):
            stack.extend(handler.body)
        for case in getattr(statement, "cases", ()):
            stack.extend(case.body)


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` (also spelled ``getattr(a, "b").c``) as ``["a", "b", "c"]``; None unless rooted at a name.

    A ``getattr`` whose name is not a string literal contributes ``"<computed>"``.
    """
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif _is_getattr(node):
            parts.append(_getattr_name(node))  # type: ignore[arg-type]
            node = node.args[0]  # type: ignore[attr-defined]
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return parts[::-1]
        else:
            return None


def _is_getattr(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) == 2 and not node.keywords


def _getattr_name(node: ast.Call) -> str:
    name = node.args[1]
    return name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else "<computed>"


def _builtin_op(parts: list[str]) -> str:
    """The op a ``torch``- or ``ops``-rooted reference names (a pseudo-op for a bare namespace)."""
    root, rest = parts[0], parts[1:]
    namespace = "aten"
    if root == "torch":
        if rest[:1] == ["ops"]:
            namespace, rest = (rest[1], rest[2:]) if len(rest) >= 2 else ("aten", [])
    elif rest:  # ops.NS...
        namespace, rest = rest[0], rest[1:]
    while len(rest) > 1 and rest[0] == "autograd":
        namespace, rest = "aten", rest[1:]
    if not rest or rest == ["autograd"]:
        return f"{'.'.join(parts)} (an operator namespace used as a value)"
    return f"{namespace}::{rest[0]}"


_Item = tuple[ast.AST, "_Context"]


@dataclass(frozen=True)
class _Context:
    scope: tuple[str, ...] = ()  # enclosing class and function names
    in_type: bool = False  # an annotation or a type argument
    shadowed: frozenset[str] = frozenset()  # builtin names (print, fork) bound as locals here

    def as_type(self) -> _Context:
        return _Context(self.scope, True, self.shadowed)

    def as_value(self) -> _Context:
        return _Context(self.scope, False, self.shadowed)


def _bound_builtin_names(node: ast.AST) -> frozenset[str]:
    """Which of print/fork/awaitable a function binds itself (as a parameter or by assignment).

    The TorchScript printer renames a local called ``torch`` or ``ops``, but not one called ``print``.
    """
    names: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.arg):
            names.add(child.arg)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
    return frozenset(names & _BUILTIN_NAME_OPS.keys())


@dataclass
class _Scanner:
    file_name: str
    defined: set[str]
    ops: dict[str, str]
    may_shadow: bool  # the file's text mentions print, fork or awaitable at all

    def add(self, op: str, context: _Context) -> None:
        self.ops.setdefault(op, f"{self.file_name}: {'.'.join(context.scope) or '<module>'}")

    def scan(self, tree: ast.Module) -> None:
        # An explicit stack, not recursion: deeply nested code must not exhaust Python's stack.
        stack: list[_Item] = [(tree, _Context())]
        while stack:
            node, context = stack.pop()
            children = self._type_children(node, context) if context.in_type else self._visit(node, context)
            stack.extend(reversed(children))

    def _type_children(self, node: ast.AST, context: _Context) -> list[_Item]:
        """In a type, only torchbind class names matter."""
        parts = _dotted(node) if isinstance(node, ast.Attribute) else None
        if parts is not None:
            self._torchbind(parts, context)
            return []
        return [(child, context) for child in ast.iter_child_nodes(node)]

    def _visit(self, node: ast.AST, context: _Context) -> list[_Item]:
        """Report what ``node`` itself references; return its children still to scan."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return self._definition_children(node, context)
        if isinstance(node, ast.AnnAssign):
            children: list[_Item] = [(node.annotation, context.as_type()), (node.target, context)]
            return children + ([(node.value, context)] if node.value is not None else [])
        if isinstance(node, ast.Call) and not _is_getattr(node):
            return self._visit_call(node, context)
        if isinstance(node, (ast.Attribute, ast.Name)) or _is_getattr(node):
            parts = _dotted(node)
            if parts is not None:
                self._reference(parts, context)
                return []
            # An attribute of a computed value, e.g. (a + b).shape: scan the value.
            if isinstance(node, ast.Attribute):
                return [(node.value, context)]
            if _getattr_name(node) == "<computed>":  # type: ignore[arg-type]
                self.add("getattr with a computed name", context)
            return [(node.args[0], context)]  # type: ignore[attr-defined]
        return [(child, context) for child in ast.iter_child_nodes(node)]

    def _definition_children(self, node: ast.AST, context: _Context) -> list[_Item]:
        shadowed = context.shadowed
        if self.may_shadow and not isinstance(node, ast.ClassDef):
            shadowed |= _bound_builtin_names(node)
        inner = _Context((*context.scope, node.name), False, shadowed)  # type: ignore[attr-defined]
        children: list[_Item] = []
        if isinstance(node, ast.ClassDef):
            children += [(base, inner) for base in node.bases]
            children += [(keyword.value, inner) for keyword in node.keywords]
        else:
            arguments: ast.arguments = node.args  # type: ignore[attr-defined]
            every_argument = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            every_argument += [arg for arg in (arguments.vararg, arguments.kwarg) if arg is not None]
            children += [(arg.annotation, inner.as_type()) for arg in every_argument if arg.annotation is not None]
            # Defaults are evaluated where the function is defined, outside its locals.
            children += [(default, context.as_value()) for default in [*arguments.defaults, *arguments.kw_defaults] if default]
            returns = node.returns  # type: ignore[attr-defined]
            if returns is not None:
                children.append((returns, inner.as_type()))
        children += [(decorator, context.as_value()) for decorator in node.decorator_list]  # type: ignore[attr-defined]
        children += [(statement, inner) for statement in node.body]  # type: ignore[attr-defined]
        return children

    def _visit_call(self, node: ast.Call, context: _Context) -> list[_Item]:
        func = node.func
        values: list[_Item] = [(argument, context) for argument in node.args]
        values += [(keyword.value, context) for keyword in node.keywords]
        if isinstance(func, ast.Name):
            if func.id in _TYPE_FIRST_ARGUMENT and node.args:
                return [(node.args[0], context.as_type()), *values[1:]]
            if func.id == "uninitialized":
                return [(value, context.as_type()) for value, _ in values]
            if func.id == "isinstance" and len(node.args) == 2 and not node.keywords:
                return [values[0], (node.args[1], context.as_type())]
            self._reference([func.id], context)
            return values
        parts = _dotted(func)
        if parts is not None:
            if not self._reference(parts, context):
                # obj.method(...) on a local value: the archive's own method, or a builtin one.
                self._method(parts[-1], context)
            return values
        if isinstance(func, ast.Attribute):  # (expression).method(...)
            self._method(func.attr, context)
            return [(func.value, context), *values]
        if _is_getattr(func):  # getattr(expression, "method")(...)
            self._method(_getattr_name(func), context)  # type: ignore[arg-type]
            return [(func.args[0], context), *values]  # type: ignore[attr-defined]
        return [(func, context), *values]

    def _method(self, name: str, context: _Context) -> None:
        if name == "<computed>":
            self.add("getattr with a computed name", context)
        elif name not in self.defined:
            self.add(_METHOD_OPS.get(name, f"aten::{name}"), context)

    def _reference(self, parts: list[str], context: _Context) -> bool:
        """Report a dotted reference; False when it is a local value (so a call on it is a method call)."""
        if "<computed>" in parts:
            self.add("getattr with a computed name", context)
        root = parts[0]
        if root in ("torch", "ops"):
            self.add(_builtin_op(parts), context)
            return True
        if root == "__torch__":
            self._torchbind(parts, context)
            return True
        if len(parts) == 1:
            if root in _BUILTIN_NAME_OPS and root not in context.shadowed:
                self.add(_BUILTIN_NAME_OPS[root], context)
            return True
        return False

    def _torchbind(self, parts: list[str], context: _Context) -> None:
        if tuple(parts[:3]) == _TORCHBIND_PREFIX and len(parts) > 3:
            self.add(f"torchbind class {'.'.join(parts)}", context)
