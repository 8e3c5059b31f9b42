"""The op allowlist in practice: real models pass both checkers, programs that touch files are refused by both.

Two checkers look at an uploaded TorchScript archive: the gateway's text scan
of the archive's code (``compactor.torchscript_code``, no torch) and the
worker's walk of the loaded graphs (``worker.compression.graph_check``). Every
torchvision classifier, scripted and traced, must pass both (the text scan
must never refuse what the walker accepts), and every way of reaching
``aten::from_file`` from a model must be refused by both.
"""

from __future__ import annotations

import contextlib
import io
import operator
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from compactor.errors import InvalidModel, UnsafeModel
from compactor.graph_ops import ALLOWED_OPS
from compactor.torchscript_code import check_torchscript_code, torchscript_code_ops
from tests.support.models import TinyCNN
from worker.compression.graph_check import (
    _fx_op_name,
    check_exported_program,
    check_torchscript,
    exported_program_ops,
    torchscript_ops,
)

TORCHVISION_CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# The smallest input side each classifier accepts: 224 for the transformers (their image size is
# fixed), 75 for inception_v3, 64 for the rest.
_INPUT_SIDE = {"inception_v3": 75}
_NEEDS_224 = ("vit_", "swin_", "maxvit_")


def _uninitialised(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Build models without initialising their weights: the checks read graphs, not weights.

    Random initialisation of the largest classifiers takes seconds each, and even zeroing them costs
    a minute over the sweep; left alone, a large parameter is untouched memory until something reads it.
    """
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, _uninitialised)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Uninitialised weights may hold denormals, which make the forward pass that tracing runs crawl."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _torchvision_model(name: str) -> nn.Module:
    kwargs: dict[str, object] = {"weights": None, "num_classes": 10}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    with _no_weight_init():
        return torchvision.models.get_model(name, **kwargs).eval()


def _input_for(name: str) -> torch.Tensor:
    side = 224 if name.startswith(_NEEDS_224) else _INPUT_SIDE.get(name, 64)
    return torch.zeros(1, 3, side, side)


def _save(module: torch.jit.ScriptModule, path: Path) -> Path:
    torch.jit.save(module, str(path))
    return path


def _assert_both_accept(module: torch.jit.ScriptModule, tmp_path: Path) -> None:
    check_torchscript(module)
    # The archive's tensors do not matter to the text scan: moved to meta, the archive keeps only code.
    archive = _save(module.to("meta"), tmp_path / "model.ts")
    check_torchscript_code(archive)


# --------------------------------------------------------------------------- (a) torchvision


# One model of each family runs by default (~60 s on two cores); the other ~60 (~3 min more) run
# with `make sweep` (pytest -m sweep), which `make bench` includes.
_ONE_PER_FAMILY = frozenset(
    {
        "alexnet",
        "convnext_tiny",
        "densenet121",
        "efficientnet_b0",
        "efficientnet_v2_s",
        "googlenet",
        "inception_v3",
        "maxvit_t",
        "mnasnet0_5",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "regnet_x_400mf",
        "regnet_y_400mf",
        "resnet18",
        "resnext50_32x4d",
        "shufflenet_v2_x0_5",
        "squeezenet1_0",
        "swin_t",
        "swin_v2_t",
        "vgg11_bn",
        "vit_b_32",
        "wide_resnet50_2",
    }
)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in _ONE_PER_FAMILY else pytest.mark.sweep) for name in TORCHVISION_CLASSIFIERS])
def test_torchvision_classifiers_pass_both_checkers(name: str, tmp_path: Path) -> None:
    """Scripted and traced: both forms are built from one model (building is half the cost of the sweep)."""
    model = _torchvision_model(name)
    with torch.no_grad(), _flush_denormals():
        traced = torch.jit.trace(model, _input_for(name), check_trace=False)
    scripted = torch.jit.script(model)
    # Both share the model's parameters, which _assert_both_accept moves to meta: build both first.
    for form, module in (("traced", traced), ("scripted", scripted)):
        (tmp_path / form).mkdir()
        try:
            _assert_both_accept(module, tmp_path / form)
        except UnsafeModel as error:
            raise AssertionError(f"{name}, {form}: {error.message}") from error


# --------------------------------------------------------------------------- (b) the test suite's own models


@pytest.mark.parametrize("form", ["script", "trace"])
def test_tiny_cnn_passes_both_checkers(form: str, tmp_path: Path) -> None:
    model = TinyCNN().eval()
    module = torch.jit.script(model) if form == "script" else torch.jit.trace(model, torch.zeros(2, 1, 8, 8))
    _assert_both_accept(module, tmp_path)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_frozen_and_inference_optimized_models_pass_both_checkers(name: str, tmp_path: Path) -> None:
    """What deployment tooling writes: constants folded in (freeze), oneDNN layouts (optimize_for_inference)."""
    scripted = torch.jit.script(_torchvision_model(name))
    _assert_both_accept(torch.jit.freeze(scripted), tmp_path)
    _assert_both_accept(torch.jit.optimize_for_inference(torch.jit.script(_torchvision_model(name))), tmp_path)


@torch.jit.script
class _Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def bump(self, by: int) -> int:
        self.value += by
        return self.value


@torch.jit.script
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


class _Relu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class _EveryConstruct(nn.Module):
    """Legitimate TorchScript that uses every structural construct: all of it must pass both checkers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), _Relu())
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        self.calls = self.calls + 1
        if x.dim() != 4:
            raise ValueError(f"expected 4D input, got {x.dim()}D")
        counter = _Counter(0)
        counter.bump(1)
        y = self.body(x).mean(dim=(2, 3))
        outputs: list[torch.Tensor] = []
        for head in self.heads:
            outputs.append(head(y))
        pair = (outputs[0], outputs[1])
        first, second = pair
        table = {"first": first}
        with torch.no_grad():
            second = second * 1.0
        future = torch.jit.fork(_plus_one, second)
        second = torch.jit.wait(future)
        if scale is not None:
            first = first * scale
        for step in range(2):
            if step > 5:
                break
            first = first + step
        return _double(table["first"]) + second + len(outputs) + float(x.shape[0])


def test_every_structural_construct_passes_both_checkers(tmp_path: Path) -> None:
    module = torch.jit.script(_EveryConstruct().eval())
    found = torchscript_ops(module)
    for kind in ("prim::If", "prim::Loop", "prim::fork", "prim::Enter", "prim::CreateObject", "prim::SetAttr"):
        assert kind in found
    _assert_both_accept(module, tmp_path)


class _ShadowsBuiltins(nn.Module):
    def forward(self, x: torch.Tensor, print: int, ops: int, fork: int) -> torch.Tensor:
        return x + print + ops + fork


def test_locals_named_like_builtins_are_not_ops(tmp_path: Path) -> None:
    """The printer keeps a parameter called `print` (and renames `ops`, `fork`): it is not prim::Print."""
    _assert_both_accept(torch.jit.script(_ShadowsBuiltins()), tmp_path)


# --------------------------------------------------------------------------- (c) attacks


class _ReadsFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8)
        return x + data.sum()


class _WritesFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file("/etc/hostname", shared=True, size=4, dtype=torch.uint8)
        return x + data.sum()


class _Reader(nn.Module):
    @torch.jit.export
    def read(self) -> torch.Tensor:
        return torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _ReadsInSubmoduleMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reader = _Reader()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reader(x) + self.reader.read().sum()


class _ReadsInBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            if bool(x.sum() > 0):
                x = x + torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8).sum()
        return x


@torch.jit.script
def _read_helper(size: int) -> torch.Tensor:
    return torch.from_file("/etc/hostname", shared=False, size=size, dtype=torch.uint8)


class _ReadsInHelperFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _read_helper(4).sum()


def _forked_read(x: torch.Tensor) -> torch.Tensor:
    return x + torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8).sum()


class _ReadsInForkedTask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.jit.wait(torch.jit.fork(_forked_read, x))


class _Prints(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("the model says hello")
        return x


class _ReadsThroughTorchOps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ops.aten.from_file("/etc/hostname", False, 4, dtype=torch.uint8).sum()


@torch.jit.script
class _ReadingContext:
    def __init__(self) -> None:
        self.size = 4

    def __enter__(self) -> None:
        self.size = int(torch.from_file("/etc/hostname", shared=False, size=self.size, dtype=torch.uint8).sum())

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        pass


class _ReadsInWithBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _ReadingContext():
            x = x + 1
        return x


def _read_hook(module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    return (inputs[0] + torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8).sum(),)


def _hooked() -> nn.Module:
    model = _Relu()
    model.register_forward_pre_hook(_read_hook)
    return model


class _ReadsWhenLoaded(nn.Module):
    """``torch.jit.load`` calls __setstate__: the read happens at load time, before any forward."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 4

    @torch.jit.export
    def __getstate__(self) -> int:
        return self.size

    @torch.jit.export
    def __setstate__(self, state: int) -> None:
        self.size = int(torch.from_file("/etc/hostname", shared=False, size=state, dtype=torch.uint8).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


ATTACKS = {
    "from_file in forward": (_ReadsFile, "aten::from_file"),
    "from_file shared=True": (_WritesFile, "aten::from_file"),
    "from_file in a submodule method": (_ReadsInSubmoduleMethod, "aten::from_file"),
    "from_file in an if inside a for": (_ReadsInBranch, "aten::from_file"),
    "from_file in a script function": (_ReadsInHelperFunction, "aten::from_file"),
    "from_file in a forked task": (_ReadsInForkedTask, "aten::from_file"),
    "print": (_Prints, "prim::Print"),
    "torch.ops.aten.from_file": (_ReadsThroughTorchOps, "aten::from_file"),
    "from_file in a context manager's __enter__": (_ReadsInWithBlock, "aten::from_file"),
    "from_file in a forward pre-hook": (_hooked, "aten::from_file"),
    "from_file in __setstate__": (_ReadsWhenLoaded, "aten::from_file"),
}


def _refusal(check, target) -> str:
    with pytest.raises(UnsafeModel) as caught:
        check(target)
    assert caught.value.code == "unsafe_model"
    return caught.value.message


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_are_refused_by_both_checkers(attack: str, tmp_path: Path) -> None:
    build, op = ATTACKS[attack]
    module = torch.jit.script(build())
    message = _refusal(check_torchscript, module)
    assert message.startswith(f"the model calls {op} (in "), message
    archive = _save(module, tmp_path / "attack.ts")
    message = _refusal(check_torchscript_code, archive)
    assert message.startswith(f"the model calls {op} (in code/__torch__"), message
    if attack != "from_file in __setstate__":  # loading that one would run it
        assert op in torchscript_ops(torch.jit.load(str(archive)))


def test_the_refusal_says_where_the_op_is(tmp_path: Path) -> None:
    module = torch.jit.script(_ReadsInSubmoduleMethod())
    assert torchscript_ops(module)["aten::from_file"] == "read of reader"
    assert torchscript_ops(module)["prim::GetAttr"] == "forward of the model"
    where = torchscript_code_ops(_save(module, tmp_path / "attack.ts"))["aten::from_file"]
    assert where.startswith("code/__torch__/") and where.endswith(".py: _Reader.read"), where


def test_a_torchbind_object_is_refused_by_both_checkers(tmp_path: Path) -> None:
    """Quantized layers hold C++ packed-parameter objects (and call quantized:: ops): nothing here can inspect them."""
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    module = torch.jit.script(QuantizedLinear(4, 2))
    found = torchscript_ops(module)
    assert "torchbind class __torch__.torch.classes.quantized.LinearPackedParamsBase" in found
    with pytest.raises(UnsafeModel):
        check_torchscript(module)
    code_ops = torchscript_code_ops(_save(module, tmp_path / "quantized.ts"))
    assert "torchbind class __torch__.torch.classes.quantized.LinearPackedParamsBase" in code_ops
    assert "quantized::linear" in code_ops


@torch.jit.interface
class _TensorFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pass


class _CallsThroughInterface(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.impl = _Relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl.forward(x)


# Set here, not in the class body: this file's postponed annotations are strings, which TorchScript cannot read there.
_CallsThroughInterface.__annotations__ = {"impl": _TensorFunction}


def test_a_call_through_an_interface_is_refused_by_the_walker(tmp_path: Path) -> None:
    """Which implementation an interface call reaches is not known from the graph; the walker refuses it.

    The text scan cannot tell an interface call from a method call and lets it through (it may accept
    more than the walker, never less)."""
    module = torch.jit.script(_CallsThroughInterface())
    message = _refusal(check_torchscript, module)
    assert message.startswith("the model calls prim::CallMethod on __torch__."), message
    assert "_TensorFunction (in forward of the model (method forward))" in message
    check_torchscript_code(_save(module, tmp_path / "interface.ts"))


# Hand-written archive code: what torch.jit.load compiles but torch.jit.save never writes.


class _AddsOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _hand_edited(tmp_path: Path, body: str) -> Path:
    """A TorchScript archive whose forward's ``return`` line is replaced by ``body`` (code text only)."""
    source = _save(torch.jit.script(_AddsOne()), tmp_path / "base.ts")
    target = tmp_path / "edited.ts"
    line = "    return torch.add(x, 1)\n"
    edits = 0
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as edited:
        for info in original.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue  # source ranges of the original text
            data = original.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py") and line.encode() in data:
                data = data.replace(line.encode(), body.encode())
                edits += 1
            edited.writestr(info, data)
    assert edits == 1
    return target


_READ = '"/etc/hostname", False, 4)'
HAND_WRITTEN = {
    "torch.autograd namespace": f"    d = torch.autograd.from_file({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "getattr on torch": f'    d = getattr(torch, "from_file")({_READ}\n    return torch.add(x, torch.sum(d))\n',
    "builtin in a variable": f"    f = torch.from_file\n    d = f({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "torch in a variable": f"    t = torch\n    d = t.from_file({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "ops namespace": f"    d = ops.aten.from_file({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "ops namespace in a variable": f"    o = ops.aten\n    d = o.from_file({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "ops.prim.autograd": f"    d = ops.prim.autograd.from_file({_READ}\n    return torch.add(x, torch.sum(d))\n",
    "torch.save": '    _0 = torch.save(x, "/tmp/compactor-test-never-written")\n    return torch.add(x, 1)\n',
}


@pytest.mark.parametrize("trick", list(HAND_WRITTEN))
def test_hand_written_code_tricks_are_refused_by_both_checkers(trick: str, tmp_path: Path) -> None:
    archive = _hand_edited(tmp_path, HAND_WRITTEN[trick])
    op = "aten::save" if trick == "torch.save" else "aten::from_file"
    assert op in torchscript_code_ops(archive)
    with pytest.raises(UnsafeModel):
        check_torchscript_code(archive)
    # torch compiles every one of them to the op (loading runs no forward), and the walker refuses it.
    loaded = torch.jit.load(str(archive))
    assert op in torchscript_ops(loaded)
    with pytest.raises(UnsafeModel):
        check_torchscript(loaded)


def test_code_that_does_not_parse_is_invalid(tmp_path: Path) -> None:
    archive = _hand_edited(tmp_path, "    return torch.add(x, 1\n")
    with pytest.raises(InvalidModel, match="the archive's code cannot be read") as caught:
        check_torchscript_code(archive)
    assert not isinstance(caught.value, UnsafeModel)


def test_code_with_control_characters_is_invalid(tmp_path: Path) -> None:
    archive = _hand_edited(tmp_path, "    return torch.add(x, 1)\x0c\n")
    with pytest.raises(InvalidModel, match="control character"):
        check_torchscript_code(archive)


def test_too_much_code_is_invalid(tmp_path: Path) -> None:
    archive = _save(torch.jit.script(TinyCNN()), tmp_path / "tiny.ts")
    assert torchscript_code_ops(archive)
    with pytest.raises(InvalidModel, match="bytes of code, above the limit"):
        torchscript_code_ops(archive, max_code_bytes=100)


def test_a_file_that_is_not_an_archive_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "junk.ts"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InvalidModel):
        check_torchscript_code(path)


# --------------------------------------------------------------------------- (d) torch.export


def test_exported_resnet18_calls_only_allowlisted_ops() -> None:
    model = _torchvision_model("resnet18")
    program = torch.export.export(model, (torch.zeros(1, 3, 64, 64),))
    found = exported_program_ops(program)
    assert {"aten::conv2d", "aten::linear"} <= found.keys()
    assert sorted(op for op in found if op not in ALLOWED_OPS) == []
    check_exported_program(program)
    decomposed = exported_program_ops(program.run_decompositions())
    assert "aten::convolution" in decomposed
    assert sorted(op for op in decomposed if op not in ALLOWED_OPS) == []


class _Branches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))


def test_export_control_flow_subgraphs_are_walked() -> None:
    program = torch.export.export(_Branches(), (torch.zeros(3),))
    found = exported_program_ops(program)
    assert {"aten::sin", "aten::cos"} <= found.keys()
    assert not any(op.startswith("higher_order::") for op in found)
    check_exported_program(program)


def test_export_target_names() -> None:
    assert _fx_op_name(torch.ops.aten.conv2d.default) == "aten::conv2d"
    assert _fx_op_name(torch.ops.aten.add.Tensor) == "aten::add"
    assert _fx_op_name(torch.ops.aten.from_file.default) == "aten::from_file"
    assert _fx_op_name(operator.getitem) == "aten::__getitem__"
    assert _fx_op_name(torch.ops.higher_order.cond) is None
    assert _fx_op_name(torch.ops.higher_order.while_loop) is None
    assert _fx_op_name(torch.ops.higher_order.auto_functionalized) == "higher_order::auto_functionalized"
    assert _fx_op_name(io.open) not in ALLOWED_OPS
    assert _fx_op_name(print) not in ALLOWED_OPS
