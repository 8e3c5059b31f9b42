"""The authoritative op check: every node of every graph a model can run, against the allowlist.

An uploaded TorchScript archive is a program (see :mod:`compactor.graph_ops`).
:func:`check_torchscript` walks what the loaded module can execute and
refuses it with :class:`~compactor.errors.UnsafeModel` unless every op is
allowlisted. It does not care how the module was loaded; it must run before
the module is called (``forward``, any other method, or a hook), and
loading should happen in the confined child, since ``torch.jit.load`` itself
runs the ``__setstate__`` of objects in the archive.

What is walked (a graph that calls free functions is first copied and inlined with
``torch._C._jit_pass_inline``, since functions are reachable only through their call
sites; method calls need no inlining, as every method of every type below is walked):

* every method of every module (deduplicated by module type) and its forward
  hooks and pre-hooks, which run outside any graph;
* every method of every TorchScript class the modules hold as attributes or
  use as values (``prim::CreateObject``, ``with`` objects, whose
  ``__enter__``/``__exit__`` the interpreter calls from ``prim::Enter``/``prim::Exit``);
* inside each graph, every node, the blocks of ``prim::If``/``prim::Loop``,
  and every graph-valued attribute (the subgraph of ``prim::fork``).

What cannot be inspected is reported as a pseudo-op that no allowlist
contains, so it is refused: a ``prim::CallMethod`` left after inlining on an
interface (``"prim::CallMethod on <interface>"``: the implementation is not
known statically) or on a C++ torchbind object, a leftover ``prim::CallFunction``,
and any torchbind class (``__torch__.torch.classes.*``) a module holds or a graph uses.

:func:`exported_program_ops` does the same for a ``torch.export`` program.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from compactor.graph_ops import PYTHON_TARGETS, WALKED_HIGHER_ORDER_OPS, check_ops

_TORCHBIND_PREFIX = "__torch__.torch.classes."
_CALLS = ("prim::CallMethod", "prim::CallFunction")


@dataclass
class _Walk:
    ops: dict[str, str] = field(default_factory=dict)
    seen_types: set[str] = field(default_factory=set)
    # (class type, where it was found), walked after the modules.
    pending_classes: list[tuple[Any, str]] = field(default_factory=list)

    def add(self, op: str, where: str) -> None:
        self.ops.setdefault(op, where)

    def graph(self, graph: torch._C.Graph, where: str) -> None:
        if graph.findAllNodes("prim::CallFunction", True):
            # Free functions are only reachable through their call sites: inline them (on a copy).
            # Method calls need no inlining, since every method of every module and class is walked;
            # skipping it keeps a traced model (one module type per submodule) linear to walk.
            graph = graph.copy()
            torch._C._jit_pass_inline(graph)
        for value in graph.inputs():
            self.note_type(value.type(), where)
        self.block(graph.block(), where)

    def block(self, block: torch._C.Block, where: str) -> None:
        # An explicit stack: nesting depth comes from the upload.
        stack = [block]
        while stack:
            current = stack.pop()
            for node in current.nodes():
                kind = node.kind()
                self.add(kind, where)
                if kind in _CALLS:
                    self.leftover_call(node, where)
                for output in node.outputs():
                    self.note_type(output.type(), where)
                stack.extend(node.blocks())
                for name in node.attributeNames():
                    attribute_kind = node.kindOf(name)
                    if attribute_kind == "g":
                        self.graph(node.g(name), f"{where} ({kind} subgraph)")
                    elif attribute_kind == "gs":
                        for subgraph in node.gs(name):
                            self.graph(subgraph, f"{where} ({kind} subgraph)")

    def leftover_call(self, node: torch._C.Node, where: str) -> None:
        """A call the inliner could not resolve: refused unless its callee is a class whose methods are walked."""
        callee = node.inputsAt(0).type()
        if node.kind() == "prim::CallMethod":
            method = node.s("name")
            if callee.kind() == "ClassType" and not _is_torchbind(callee):
                return  # an archive class: all its methods are walked (note_type queues it)
            self.add(f"prim::CallMethod on {callee.annotation_str}", f"{where} (method {method})")
        else:
            self.add(f"prim::CallFunction on {callee.annotation_str}", where)

    def note_type(self, value_type: Any, where: str) -> None:
        """Queue the TorchScript classes a type names; report torchbind classes."""
        stack = [value_type]
        while stack:
            current = stack.pop()
            kind = current.kind()
            if kind in ("TensorType", "IntType", "FloatType", "BoolType", "NoneType", "StringType", "DeviceObjType"):
                continue
            if kind == "ClassType":
                name = current.qualified_name()
                if name in self.seen_types:
                    continue
                self.seen_types.add(name)
                if name.startswith(_TORCHBIND_PREFIX):
                    self.add(f"torchbind class {name}", where)
                    continue
                self.pending_classes.append((current, where))
                stack.extend(current.containedTypes())
            elif kind == "InterfaceType":
                continue  # calls through it are reported where they happen
            else:
                stack.extend(current.containedTypes())

    def modules(self, module: torch.jit.ScriptModule) -> None:
        # One entry per module type (the methods of a type are one set of graphs); all of them are
        # marked seen first, so that finding a submodule's type in a graph never queues it as a class.
        by_type: dict[str, tuple[str, torch._C.ScriptModule]] = {}
        for path, submodule in module.named_modules():
            by_type.setdefault(submodule._c._type().qualified_name(), (path or "the model", submodule._c))
        self.seen_types.update(by_type)
        for label, script_module in by_type.values():
            for method in script_module._method_names():
                self.graph(script_module._get_method(method).graph, f"{method} of {label}")
            for hook in script_module._get_forward_pre_hooks():
                self.graph(hook.graph, f"forward pre-hook {hook.name} of {label}")
            for hook in script_module._get_forward_hooks():
                self.graph(hook.graph, f"forward hook {hook.name} of {label}")
            # Attribute types: objects the module holds, even if no method uses them.
            for attribute_type in script_module._type().containedTypes():
                self.note_type(attribute_type, f"attributes of {label}")

    def classes(self) -> None:
        while self.pending_classes:
            class_type, found_in = self.pending_classes.pop()
            name = class_type.qualified_name()
            where = f"class {name} (used in {found_in})"
            try:
                # An empty instance (no __init__ runs) is the way to reach a class's methods from Python.
                instance = torch._C._create_object_with_type(class_type)
                graphs = [(method, instance._get_method(method).graph) for method in class_type.method_names()]
            except RuntimeError:
                self.add(f"uninspectable class {name}", where)
                continue
            for method, graph in graphs:
                self.graph(graph, f"{method} of {where}")


def _is_torchbind(value_type: Any) -> bool:
    return value_type.kind() == "ClassType" and value_type.qualified_name().startswith(_TORCHBIND_PREFIX)


def torchscript_ops(module: torch.jit.ScriptModule) -> dict[str, str]:
    """Every op (node kind) ``module`` can run, mapped to the first place it was found.

    Places read like ``"forward of features.0"``; pseudo-ops name what cannot be
    checked (see the module docstring).
    """
    walk = _Walk()
    walk.modules(module)
    walk.classes()
    return walk.ops


def check_torchscript(module: torch.jit.ScriptModule) -> None:
    """Raise :class:`~compactor.errors.UnsafeModel` unless every op ``module`` can run is allowlisted."""
    check_ops(torchscript_ops(module))


# ----------------------------------------------------------------- torch.export


def _fx_op_name(target: Any) -> str | None:
    """``aten.conv2d.default`` as ``aten::conv2d``; None for a higher-order op whose subgraphs are walked."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.HigherOrderOperator):
        name = target.name()
        return None if name in WALKED_HIGHER_ORDER_OPS else f"higher_order::{name}"
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__qualname__
    return PYTHON_TARGETS.get(f"{module}.{name}", f"python::{module}.{name}")


def exported_program_ops(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Every op a ``torch.export`` program calls, as TorchScript-style names, mapped to the node that calls it.

    Walks the program's graph and every nested graph module (the branches and
    bodies of ``cond``/``while_loop``). Other higher-order ops are reported as
    ``higher_order::<name>``, Python callables as ``python::<module>.<name>``,
    and ``call_module``/``call_method`` nodes (which an exported program never
    has) as pseudo-ops, so none of them passes the allowlist.
    """
    ops: dict[str, str] = {}
    for path, graph_module in _graph_modules(ep.graph_module):
        label = path or "the exported graph"
        for node in graph_module.graph.nodes:
            where = f"node {node.name} of {label}"
            if node.op == "call_function":
                name = _fx_op_name(node.target)
                if name is not None:
                    ops.setdefault(name, where)
            elif node.op in ("call_module", "call_method"):
                ops.setdefault(f"fx {node.op} {node.target}", where)
    return ops


def check_exported_program(ep: torch.export.ExportedProgram) -> None:
    """Raise :class:`~compactor.errors.UnsafeModel` unless every op the program calls is allowlisted."""
    check_ops(exported_program_ops(ep))


def _graph_modules(root: torch.nn.Module) -> Iterable[tuple[str, torch.fx.GraphModule]]:
    for path, module in root.named_modules(remove_duplicate=True):
        if isinstance(module, torch.fx.GraphModule):
            yield path, module
