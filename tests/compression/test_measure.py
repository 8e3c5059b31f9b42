"""Measurements on models whose true numbers are known by hand, and on the trained tiny CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactor.errors import InvalidSpec
from tests.support.models import TinyCNN, batches_of, top1
from worker.compression.measure import (
    count_macs,
    count_parameters,
    eval_mode,
    evaluate_accuracy,
    fidelity,
    layer_stats,
    measure_latency,
    torchscript_size,
)

# The tests call torch.jit directly, which torch 2.14 marks deprecated; the code under test silences it itself.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:FutureWarning")


class _ConvThenLinear(nn.Module):
    """Conv2d(3->8, 3x3, pad 1) on 10x10, then Linear(800->5): MACs 8*10*10*3*3*3 + 800*5 = 25,600 per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 10 * 10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


HAND_COUNTED_MACS = 8 * 10 * 10 * 3 * 3 * 3 + 800 * 5
HAND_COUNTED_PARAMS = (8 * 3 * 3 * 3 + 8) + (800 * 5 + 5)


def test_macs_equal_the_hand_count_per_sample_for_modules_and_script_modules() -> None:
    torch.manual_seed(0)
    model = _ConvThenLinear().eval()
    batch = torch.randn(4, 3, 10, 10)

    assert count_macs(model, batch) == HAND_COUNTED_MACS
    assert count_macs(torch.jit.trace(model, batch[:1]), batch[:1]) == HAND_COUNTED_MACS
    assert count_macs(torch.jit.freeze(torch.jit.script(model)), batch) == HAND_COUNTED_MACS


def test_grouped_conv_macs_divide_by_groups() -> None:
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(depthwise, torch.randn(2, 8, 6, 6)) == 8 * 6 * 6 * 3 * 3


def test_parameter_counts_after_zeroing_known_weights() -> None:
    torch.manual_seed(0)
    model = _ConvThenLinear()
    with torch.no_grad():
        model.conv.weight[:2].zero_()  # two whole filters: 2 * 3*3*3 weights
        model.fc.weight[0, :100].zero_()

    params, nonzero = count_parameters(model)
    assert params == HAND_COUNTED_PARAMS
    assert nonzero == HAND_COUNTED_PARAMS - 54 - 100
    assert count_parameters(torch.jit.script(model)) == (params, nonzero)


def test_layer_stats_report_sparsity_and_channels() -> None:
    torch.manual_seed(0)
    model = _ConvThenLinear()
    with torch.no_grad():
        model.conv.weight[:2].zero_()

    stats = {layer["name"]: layer for layer in layer_stats(model)}

    assert list(stats) == ["conv", "fc"]
    conv = stats["conv"]
    assert (conv["type"], conv["params"], conv["nonzero"]) == ("Conv2d", 224, 170)
    assert conv["sparsity"] == pytest.approx(54 / 224)
    assert (conv["out_channels"], conv["in_channels"]) == (8, 3)
    assert (stats["fc"]["out_channels"], stats["fc"]["in_channels"], stats["fc"]["sparsity"]) == (5, 800, 0.0)
    scripted_stats = layer_stats(torch.jit.script(model))
    assert [(layer["name"], layer["nonzero"]) for layer in scripted_stats] == [("conv", 170), ("fc", 4005)]


def test_torchscript_size_is_dominated_by_weights(tiny_cnn) -> None:
    params, _ = count_parameters(tiny_cnn)
    size = torchscript_size(torch.jit.script(tiny_cnn))
    assert 4 * params <= size <= 4 * params + 200_000


def test_latency_structure_and_thread_count_restored(tiny_cnn) -> None:
    threads_before = torch.get_num_threads()
    other = TinyCNN(width=8).eval()

    latency = measure_latency({"original": tiny_cnn, "compressed": other}, [1, 1, 8, 8], batch_sizes=(1, 4), threads=1, warmup=1, runs=3)

    assert set(latency) == {"original", "compressed"}
    for per_batch in latency.values():
        assert set(per_batch) == {"batch_1", "batch_4"}
        for percentiles in per_batch.values():
            assert set(percentiles) == {"p50", "p90", "runs", "iqr_ms"}
            assert 0.0 < percentiles["p50"] <= percentiles["p90"]
    assert torch.get_num_threads() == threads_before


def test_adaptive_timing_spends_its_budget_on_slow_models_only(tiny_cnn) -> None:
    """A 0.2 s call stops after the minimum of 3 once its 0.5 s budget is spent; a fast model in
    the same interleaved rounds still gets every one of its 30 runs."""
    import time

    def slow(inputs: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return inputs

    latency = measure_latency({"slow": slow, "fast": tiny_cnn}, [1, 1, 8, 8], batch_sizes=(1,), threads=1, warmup=5, runs=30, budget_s=0.5)

    assert latency["slow"]["batch_1"]["runs"] == 3
    assert latency["slow"]["batch_1"]["p50"] >= 200.0
    assert latency["fast"]["batch_1"]["runs"] == 30


def test_latency_rejects_nonsense_settings(tiny_cnn) -> None:
    with pytest.raises(InvalidSpec):
        measure_latency({"m": tiny_cnn}, [1, 1, 8, 8], threads=0, warmup=0, runs=1)


def test_accuracy_matches_direct_count_and_needs_targets(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits

    accuracy = evaluate_accuracy(tiny_cnn, batches_of(test_x, test_y, batch_size=50), "cpu")

    assert accuracy is not None
    assert accuracy["top1"] == pytest.approx(top1(tiny_cnn, test_x, test_y))
    assert accuracy["top1"] <= accuracy["top5"] <= 1.0
    assert accuracy["samples"] == len(test_y)
    assert evaluate_accuracy(tiny_cnn, batches_of(test_x, None), "cpu") is None


def test_top5_is_capped_at_the_number_of_classes() -> None:
    three_classes = nn.Linear(4, 3).eval()
    inputs = torch.randn(10, 4)
    targets = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    accuracy = evaluate_accuracy(three_classes, batches_of(inputs, targets), "cpu")
    assert accuracy is not None and accuracy["top5"] == 1.0


def test_fidelity_of_a_model_with_itself_is_one_and_drops_for_another(tiny_cnn, digits) -> None:
    _, _, test_x, _ = digits
    unlabelled = batches_of(test_x[:128], None)

    same = fidelity(tiny_cnn, tiny_cnn, unlabelled, "cpu", "cpu")
    different = fidelity(tiny_cnn, TinyCNN().eval(), unlabelled, "cpu", "cpu")

    assert same["top1_agreement"] == 1.0
    assert same["output_cosine"] == pytest.approx(1.0)
    assert different["top1_agreement"] < 0.5
    assert different["output_cosine"] < 0.9


def test_measurements_restore_training_flags(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    tiny_cnn.train()
    tiny_cnn.features[1].eval()
    flags = [module.training for module in tiny_cnn.modules()]

    evaluate_accuracy(tiny_cnn, batches_of(test_x[:64], test_y[:64]), "cpu")
    count_macs(tiny_cnn, test_x[:2])
    with eval_mode(tiny_cnn):
        assert not any(module.training for module in tiny_cnn.modules())

    assert [module.training for module in tiny_cnn.modules()] == flags
