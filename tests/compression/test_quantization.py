"""INT8 quantization on the trained tiny CNN and held-out digits: accuracy kept, size cut, float layers named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactor.errors import Cancelled, InvalidDataset, InvalidSpec, UnsupportedCombination
from compactor.spec import DynamicQuantizeSpec, StaticQuantizeSpec
from tests.support.models import batches_of, top1
from worker.compression.context import RunContext
from worker.compression.export import to_torchscript
from worker.compression.measure import torchscript_size
from worker.compression.quantization import available_modes, quantize, torchscript_has_int8_ops

CALIBRATION_BATCHES = 3

# The tests call torch.jit directly, which torch 2.14 marks deprecated; the code under test silences it itself.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:FutureWarning")


def _calibration(digits):
    train_x, train_y, _, _ = digits
    return batches_of(train_x, train_y, batch_size=64)


@pytest.mark.parametrize("backend,per_channel", [("x86", True), ("qnnpack", False)])
def test_static_int8_keeps_accuracy_and_shrinks_torchscript(tiny_cnn, digits, backend, per_channel) -> None:
    _, _, test_x, test_y = digits
    ctx = RunContext()
    float_top1 = top1(tiny_cnn, test_x, test_y)
    engine_before = torch.backends.quantized.engine

    result = quantize(
        tiny_cnn,
        StaticQuantizeSpec(backend=backend, per_channel=per_channel, calibration_batches=CALIBRATION_BATCHES),
        example_inputs=test_x[:1],
        calibration=_calibration(digits),
        ctx=ctx,
    )

    assert torch.backends.quantized.engine == engine_before
    assert (result.mode, result.backend, result.method) == ("static", backend, "fx")
    assert result.calibration_batches_used == CALIBRATION_BATCHES
    assert result.float_layers == []
    int8_top1 = top1(result.model, test_x, test_y)
    assert int8_top1 >= float_top1 - 0.02, (float_top1, int8_top1)
    int8_size = torchscript_size(to_torchscript(result.model, test_x[:1], quantized_engine=backend))
    float_size = torchscript_size(to_torchscript(tiny_cnn, test_x[:1]))
    assert int8_size <= 0.35 * float_size, (int8_size, float_size)
    # The caller's model stays float.
    assert isinstance(tiny_cnn.features[0], nn.Conv2d)


def test_static_int8_of_torchscript_upload_uses_graph_mode(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    with torch.no_grad():
        scripted = torch.jit.trace(tiny_cnn, test_x[:1])
    float_top1 = top1(tiny_cnn, test_x, test_y)

    result = quantize(
        scripted,
        StaticQuantizeSpec(calibration_batches=CALIBRATION_BATCHES),
        example_inputs=test_x[:1],
        calibration=_calibration(digits),
        ctx=RunContext(),
    )

    assert result.method == "torchscript_graph"
    assert isinstance(result.model, torch.jit.ScriptModule)
    assert torchscript_has_int8_ops(result.model)
    assert not torchscript_has_int8_ops(scripted)
    assert result.float_layers == []
    assert top1(result.model, test_x, test_y) >= float_top1 - 0.02


class _RankFlexibleNet(nn.Module):
    """Accepts [C,H,W] or [N,C,H,W]: the rank check is Python control flow FX cannot trace."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.body(x)


def test_static_falls_back_to_submodules_when_fx_cannot_trace(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    ctx = RunContext()
    model = _RankFlexibleNet(tiny_cnn).eval()

    result = quantize(model, StaticQuantizeSpec(calibration_batches=2), example_inputs=test_x[:1], calibration=_calibration(digits), ctx=ctx)

    assert result.method == "fx_per_submodule"
    assert any("FX could not trace" in warning for warning in ctx.warnings)
    assert result.float_layers == []
    assert top1(result.model, test_x, test_y) >= top1(tiny_cnn, test_x, test_y) - 0.02


class _SequenceClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x.transpose(1, 2)).transpose(1, 2)
        output, _ = self.lstm(features)
        return self.head(output[:, -1])


def test_dynamic_int8_shrinks_lstm_mlp_and_names_convs_as_float() -> None:
    torch.manual_seed(0)
    model = _SequenceClassifier().eval()
    sequences = torch.randn(4, 12, 8)

    result = quantize(
        model, DynamicQuantizeSpec(mode="dynamic"), example_inputs=sequences[:1], calibration=batches_of(sequences, None), ctx=RunContext()
    )

    assert (result.mode, result.method, result.calibration_batches_used) == ("dynamic", "eager", 0)
    assert [(layer["name"], layer["type"]) for layer in result.float_layers] == [("stem", "Conv1d")]
    assert "static" in result.float_layers[0]["reason"]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(sequences), result.model(sequences), dim=1)
    assert cosine.min() > 0.99
    int8_size = torchscript_size(to_torchscript(result.model, sequences[:1]))
    float_size = torchscript_size(to_torchscript(model, sequences[:1]))
    assert int8_size <= 0.5 * float_size, (int8_size, float_size)


def test_dynamic_int8_of_tiny_cnn_lists_every_conv(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    result = quantize(tiny_cnn, DynamicQuantizeSpec(mode="dynamic"), example_inputs=test_x[:1], calibration=_calibration(digits), ctx=RunContext())

    assert [layer["name"] for layer in result.float_layers] == ["features.0", "features.3", "features.7"]
    assert top1(result.model, test_x, test_y) >= top1(tiny_cnn, test_x, test_y) - 0.02


def test_dynamic_int8_of_scripted_mlp_uses_graph_mode() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    inputs = torch.randn(4, 64)

    result = quantize(
        torch.jit.script(mlp), DynamicQuantizeSpec(mode="dynamic"), example_inputs=inputs[:1], calibration=batches_of(inputs, None), ctx=RunContext()
    )

    assert result.method == "torchscript_graph"
    assert torchscript_has_int8_ops(result.model)
    assert result.float_layers == []


def test_dynamic_on_a_model_without_linear_layers_is_refused() -> None:
    convs_only = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    inputs = torch.randn(2, 1, 8, 8)
    with pytest.raises(UnsupportedCombination, match="static"):
        quantize(convs_only, DynamicQuantizeSpec(mode="dynamic"), example_inputs=inputs[:1], calibration=batches_of(inputs, None), ctx=RunContext())


def test_static_without_calibration_data_is_an_invalid_dataset(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    empty = batches_of(test_x[:0], None)
    with pytest.raises(InvalidDataset):
        quantize(tiny_cnn, StaticQuantizeSpec(), example_inputs=test_x[:1], calibration=empty, ctx=RunContext())


def test_static_stops_between_batches_when_cancelled(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    with pytest.raises(Cancelled):
        quantize(
            tiny_cnn, StaticQuantizeSpec(), example_inputs=test_x[:1], calibration=_calibration(digits), ctx=RunContext(should_cancel=lambda: True)
        )


def test_progress_is_monotonic_and_reaches_one(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    seen: list[float] = []
    ctx = RunContext(progress=lambda stage, fraction: seen.append(fraction))
    quantize(
        tiny_cnn, StaticQuantizeSpec(backend="qnnpack", calibration_batches=2), example_inputs=test_x[:1], calibration=_calibration(digits), ctx=ctx
    )
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0


def test_registry_knows_both_modes_and_rejects_unknown_ones(tiny_cnn, digits) -> None:
    assert available_modes() == ["dynamic", "static"]
    spec = StaticQuantizeSpec.model_construct(mode="int4", backend="x86", calibration_batches=1, per_channel=True)
    with pytest.raises(InvalidSpec):
        quantize(tiny_cnn, spec, example_inputs=digits[2][:1], calibration=_calibration(digits), ctx=RunContext())
