"""TorchScript export: frozen archives that load in a fresh Python with plain torch, atomic writes, reload checks."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compactor.spec import StaticQuantizeSpec
from tests.support.models import TinyCNN, batches_of, top1
from worker.compression.context import RunContext
from worker.compression.export import save_state_dict, save_torchscript, to_torchscript, verify_reload
from worker.compression.quantization import quantize, torchscript_has_int8_ops

# The tests call torch.jit directly, which torch 2.14 marks deprecated; the code under test silences it itself.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:FutureWarning")


def _int8_tiny_cnn(tiny_cnn: TinyCNN, digits, backend: str = "x86") -> nn.Module:
    train_x, train_y, test_x, _ = digits
    return quantize(
        tiny_cnn,
        StaticQuantizeSpec(backend=backend, calibration_batches=2),
        example_inputs=test_x[:1],
        calibration=batches_of(train_x, train_y),
        ctx=RunContext(),
    ).model


def test_int8_archive_loads_in_a_fresh_python_without_compactor(tiny_cnn, digits, tmp_path: Path) -> None:
    _, _, test_x, _ = digits
    int8_model = _int8_tiny_cnn(tiny_cnn, digits)
    saved = save_torchscript(to_torchscript(int8_model, test_x[:1], quantized_engine="x86"), tmp_path / "model.ts")
    inputs_path = tmp_path / "inputs.pt"
    outputs_path = tmp_path / "outputs.pt"
    torch.save(test_x[:16].clone(), inputs_path)

    program = textwrap.dedent(
        f"""
        import sys, torch
        module = torch.jit.load({str(saved.path)!r})
        inputs = torch.load({str(inputs_path)!r}, weights_only=True)
        with torch.no_grad():
            torch.save(module(inputs), {str(outputs_path)!r})
        assert not any(name.startswith(("compactor", "worker", "tests")) for name in sys.modules)
        """
    )
    # cwd and an empty PYTHONPATH keep the repository off the child's import path.
    completed = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]

    with torch.no_grad():
        expected = int8_model(test_x[:16])
    reloaded_output = torch.load(outputs_path, weights_only=True)
    assert torch.allclose(reloaded_output, expected, atol=1e-5)


def test_save_is_atomic_and_reports_size_and_sha256(tiny_cnn, digits, tmp_path: Path) -> None:
    _, _, test_x, _ = digits
    module = to_torchscript(tiny_cnn, test_x[:1])
    saved = save_torchscript(module, tmp_path / "out" / "model.ts")

    on_disk = saved.path.read_bytes()
    assert saved.size_bytes == len(on_disk)
    assert saved.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert sorted(entry.name for entry in saved.path.parent.iterdir()) == ["model.ts"]


def test_verify_reload_matches_float_and_int8_and_catches_a_wrong_archive(tiny_cnn, digits, tmp_path: Path) -> None:
    _, _, test_x, _ = digits
    examples = test_x[:8]
    float_saved = save_torchscript(to_torchscript(tiny_cnn, test_x[:1]), tmp_path / "float.ts")
    int8_model = _int8_tiny_cnn(tiny_cnn, digits, backend="qnnpack")
    int8_saved = save_torchscript(to_torchscript(int8_model, test_x[:1], quantized_engine="qnnpack"), tmp_path / "int8.ts")

    float_check = verify_reload(float_saved.path, tiny_cnn, examples)
    int8_check = verify_reload(int8_saved.path, int8_model, examples, quantized_engine="qnnpack")
    other = TinyCNN().eval()
    wrong_check = verify_reload(float_saved.path, other, examples)

    assert float_check["ok"] and not float_check["quantized"]
    assert int8_check["ok"] and int8_check["quantized"]
    assert int8_check["max_abs_diff"] <= int8_check["tolerance"]
    assert not wrong_check["ok"]


def test_script_module_input_is_frozen_without_touching_the_original(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    scripted = torch.jit.script(tiny_cnn)
    scripted.train()

    exported = to_torchscript(scripted, test_x[:1])

    assert scripted.training
    assert not hasattr(exported, "training")  # frozen: attributes are folded away
    assert top1(exported, test_x, test_y) == top1(tiny_cnn, test_x, test_y)
    assert to_torchscript(exported, test_x[:1]) is exported


class _ScaleWhenBright(nn.Module):
    """Branches on the data: a trace would bake in one branch, so export must script it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0.5:
            return self.linear(x) * 2.0
        return self.linear(x)


def test_data_dependent_branch_is_scripted_not_traced() -> None:
    torch.manual_seed(0)
    model = _ScaleWhenBright().eval()
    ctx = RunContext()
    dark = torch.zeros(1, 4)
    bright = torch.ones(1, 4)

    exported = to_torchscript(model, dark, ctx=ctx)

    assert any("torch.jit.script" in warning for warning in ctx.warnings)
    with torch.no_grad():
        assert torch.allclose(exported(bright), model(bright))
        assert torch.allclose(exported(dark), model(dark))


def test_trained_model_keeps_training_flags_after_export(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    tiny_cnn.train()
    to_torchscript(tiny_cnn, test_x[:1])
    assert all(module.training for module in tiny_cnn.modules())


def test_int8_export_is_traced_from_an_fx_graph_and_runs_other_batch_sizes(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    int8_model = _int8_tiny_cnn(tiny_cnn, digits)
    exported = to_torchscript(int8_model, test_x[:1], quantized_engine="x86")
    assert torchscript_has_int8_ops(exported)
    with torch.no_grad():
        assert torch.equal(exported(test_x[:32]), int8_model(test_x[:32]))


def test_state_dict_loads_with_weights_only_into_user_code(tiny_cnn, digits, tmp_path: Path) -> None:
    _, _, test_x, _ = digits
    saved = save_state_dict(tiny_cnn, tmp_path / "model.pt")

    state = torch.load(saved.path, weights_only=True)
    fresh = TinyCNN()
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(test_x[:8]), tiny_cnn(test_x[:8]))
    assert saved.sha256 == hashlib.sha256(saved.path.read_bytes()).hexdigest()
