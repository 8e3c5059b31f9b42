"""TorchScript uploads become checked ATen graphs with real layers, so they can lose channels.

``torch._export.converter.TS2EPConverter`` (torch 2.14.1) turns a traced or scripted module into
an ``ExportedProgram`` whose batch dimension stays dynamic. It runs where the TorchScript was
loaded: in the kernel-confined job child. The program's ops are checked against the allowlist
like an uploaded ``.pt2``'s, its layers are rebuilt (``graph_modules.rebuild_layer_modules``) and
its outputs must equal the TorchScript's on the example and on another batch size; from then on
the job only runs the graph, never the TorchScript.

Where any of that fails (control flow the converter cannot express, a constant it cannot lift, a
graph that disagrees), ``GraphConversionFailed`` says which step and construct: the job then
works on the TorchScript module (unstructured pruning, quantization) and the report says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._export.converter import TS2EPConverter
from torch.export import Dim

from compactor.errors import UnsafeModel
from worker.compression.context import first_line, is_memory_exhaustion
from worker.compression.export import _max_abs_diff, quiet_export
from worker.compression.graph_check import check_exported_program
from worker.compression.graph_modules import Rebuilt, control_flow, rebuild_layer_modules

# Exactly equal is what the converter gives on every model tried; a reordered reduction may not be.
_TOLERANCE = 1e-5


class GraphConversionFailed(Exception):
    """Why a TorchScript module could not become a graph; ``str()`` is the report's wording."""


@dataclass(frozen=True)
class ConvertedGraph:
    module: fx.GraphModule
    rebuilt: Rebuilt


def _other_batch(example: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn([example.shape[0] + 1, *example.shape[1:]], generator=generator, dtype=example.dtype)


@contextlib.contextmanager
def _only_the_batch_dynamic() -> Iterator[None]:
    """TS2EPConverter retraces with every dimension ``Dim.AUTO``; symbolic image sizes then meet
    adaptive pooling arithmetic sympy cannot solve (alexnet: ``Eq(((x/8)//4) - 2, 0)``). The
    batch stays dynamic, the sample dimensions are the example's, as an nn.Module's export."""
    from torch._export import converter

    original = converter._tree_map_with_path

    def batch_only(function: Any, tree: Any, *rest: Any, **options: Any) -> Any:
        def dims(path: Any, value: Any) -> Any:
            found = function(path, value)
            if isinstance(found, list) and found:
                return [found[0], *([Dim.STATIC] * (len(found) - 1))]
            return found

        return original(dims, tree, *rest, **options)

    converter._tree_map_with_path = batch_only
    try:
        yield
    finally:
        converter._tree_map_with_path = original


def torchscript_to_graph(script: torch.jit.ScriptModule, example: torch.Tensor) -> ConvertedGraph:
    """The upload as an allowlisted ATen graph with real layer modules, outputs equal to ``script``'s.

    Raises GraphConversionFailed naming the step and the construct that blocked it.
    """
    script = script.eval()
    try:
        with quiet_export(), _only_the_batch_dynamic():
            program = TS2EPConverter(script, (example,)).convert()
    except Exception as error:  # the converter raises many types on what it cannot express
        if is_memory_exhaustion(error):
            raise
        raise GraphConversionFailed(f"torch's TorchScript→export converter stopped: {type(error).__name__}: {first_line(error, 240)}") from error
    try:
        check_exported_program(program)
    except UnsafeModel as error:
        raise GraphConversionFailed(f"the converted graph calls an op off the allowlist ({first_line(error, 240)})") from error
    flow = control_flow(program.graph_module)
    if flow:
        raise GraphConversionFailed(
            f"the program's data-dependent control flow became {', '.join(flow)}, which the TorchScript artifact cannot carry"
        )
    # No guard function in the graph: it checks input shapes with Python ints, and the module is
    # traced again with tensors (TorchScript export, Torch-Pruning); compress() checks the input itself.
    rebuilt = rebuild_layer_modules(program.module(check_guards=False))
    graph = rebuilt.module
    other = _other_batch(example)
    with torch.inference_mode():
        for inputs, what in ((example, "the example input"), (other, f"a batch of {other.shape[0]}")):
            expected = script(inputs)
            try:
                got = graph(inputs)
            except Exception as error:  # a shape the conversion fixed to the example's
                if is_memory_exhaustion(error):
                    raise
                raise GraphConversionFailed(f"the converted graph fails on {what}: {type(error).__name__}: {first_line(error, 240)}") from error
            difference, scale = _max_abs_diff(expected, got)
            relative = difference / max(1.0, scale)
            if not relative <= _TOLERANCE:  # inf where the output structures differ
                shown = "a different output structure" if relative == float("inf") else f"relative max difference {relative:.3g}"
                raise GraphConversionFailed(f"the converted graph disagrees with the TorchScript program on {what} ({shown})")
    return ConvertedGraph(module=graph, rebuilt=rebuilt)


__all__ = ["ConvertedGraph", "GraphConversionFailed", "torchscript_to_graph"]
