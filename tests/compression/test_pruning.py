"""Unstructured and channel pruning, and BatchNorm recalibration, on real models and digits."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from compactor.errors import InvalidDataset, InvalidSpec, UnsupportedCombination
from tests.support.models import TinyCNN, batches_of, top1
from worker.compression.context import RunContext
from worker.compression.criteria import get_criterion
from worker.compression.pruning import (
    MAX_LAYER_PRUNING_RATIO,
    apply_masks,
    find_head,
    prunable_layers,
    prune_channels,
    prune_unstructured,
    recalibrate_batchnorm,
    scoring_parameters,
    sparsity,
)


def score(model: nn.Module, criterion: str, *, channel_mode: bool, example: torch.Tensor, batches=None, **options):
    layers = prunable_layers(model, [], channel_mode=channel_mode, example_inputs=example)
    parameters = scoring_parameters(model, layers, channel_mode=channel_mode)
    return get_criterion(criterion, **options).score(model, parameters, batches, RunContext(), 4)


def script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; uploads in that format still have to be pruned.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(model)


def zero_fraction(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    parameters = dict(model.named_parameters())
    total = sum(parameters[name].numel() for name in masks)
    return sum(int((parameters[name] == 0).sum()) for name in masks) / total


# --- which layers ---------------------------------------------------------------------------------


def test_prunable_layers_honours_exclude_and_keeps_the_head_only_for_unstructured(tiny_cnn: TinyCNN) -> None:
    assert list(prunable_layers(tiny_cnn, [], channel_mode=False)) == ["features.0", "features.3", "features.7", "classifier"]
    assert list(prunable_layers(tiny_cnn, [], channel_mode=True)) == ["features.0", "features.3", "features.7"]
    assert list(prunable_layers(tiny_cnn, ["features.[03]"], channel_mode=False)) == ["features.7", "classifier"]


def test_head_is_found_by_tracing_even_when_registered_first() -> None:
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    model = HeadFirst()
    assert find_head(model, torch.randn(1, 4)) == "head"
    assert list(prunable_layers(model, [], channel_mode=True, example_inputs=torch.randn(1, 4))) == ["body"]


# --- unstructured ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_hits_the_requested_sparsity(tiny_cnn: TinyCNN, digits, scope: str) -> None:
    layers = prunable_layers(tiny_cnn, [], channel_mode=False)
    scores = score(tiny_cnn, "magnitude", channel_mode=False, example=digits[0][:1])
    masks = prune_unstructured(tiny_cnn, scores, 0.6, scope, layers)
    assert set(masks) == {f"{name}.weight" for name in layers}
    assert abs(sparsity(masks) - 0.6) <= 0.01
    assert abs(zero_fraction(tiny_cnn, masks) - 0.6) <= 0.01
    if scope == "layer":
        assert all(abs((1 - mask.float().mean().item()) - 0.6) <= 0.01 for mask in masks.values())
    else:
        # One global threshold: every pruned score is at most every kept one.
        pruned = torch.cat([scores[name][~mask].flatten() for name, mask in masks.items()])
        kept = torch.cat([scores[name][mask].flatten() for name, mask in masks.items()])
        assert pruned.max() <= kept.min()


def test_ties_do_not_overshoot(tiny_cnn: TinyCNN) -> None:
    layers = prunable_layers(tiny_cnn, [], channel_mode=False)
    flat_scores = {f"{name}.weight": torch.zeros_like(module.weight) for name, module in layers.items()}
    for scope in ("global", "layer"):
        masks = prune_unstructured(tiny_cnn, flat_scores, 0.3, scope, layers)
        assert abs(sparsity(masks) - 0.3) <= 0.01


def test_iterative_steps_keep_earlier_zeros(tiny_cnn: TinyCNN, digits) -> None:
    layers = prunable_layers(tiny_cnn, [], channel_mode=False)
    example = digits[0][:1]
    first = prune_unstructured(tiny_cnn, score(tiny_cnn, "random", channel_mode=False, example=example, seed=1), 0.3, "global", layers)
    # Different random scores: without the earlier masks many first-step zeros would be "kept".
    second_scores = score(tiny_cnn, "random", channel_mode=False, example=example, seed=2)
    second = prune_unstructured(tiny_cnn, second_scores, 0.6, "global", layers, previous_masks=first)
    assert abs(sparsity(second) - 0.6) <= 0.01
    assert all(not torch.any(second[name] & ~first[name]) for name in first)


def test_apply_masks_keeps_zeros_through_sgd_with_momentum(tiny_cnn: TinyCNN, digits) -> None:
    train_x, train_y, _, _ = digits
    layers = prunable_layers(tiny_cnn, [], channel_mode=False)
    masks = prune_unstructured(tiny_cnn, score(tiny_cnn, "magnitude", channel_mode=False, example=train_x[:1]), 0.5, "global", layers)
    optimizer = torch.optim.SGD(tiny_cnn.parameters(), lr=0.05, momentum=0.9)
    tiny_cnn.train()
    revived_without_masks = 0
    for step, (inputs, targets) in enumerate(batches_of(train_x, train_y)()):
        if step == 5:
            break
        optimizer.zero_grad()
        F.cross_entropy(tiny_cnn(inputs), targets).backward()
        optimizer.step()
        parameters = dict(tiny_cnn.named_parameters())
        revived_without_masks += sum(int((parameters[name][~mask] != 0).sum()) for name, mask in masks.items())
        apply_masks(tiny_cnn, masks)
        assert all(torch.all(parameters[name][~mask] == 0) for name, mask in masks.items())
    # The optimizer really did push pruned weights off zero; the masks are what held them.
    assert revived_without_masks > 0


def test_unstructured_prunes_torchscript_modules(tiny_cnn: TinyCNN, digits) -> None:
    scripted = script(tiny_cnn)
    layers = prunable_layers(scripted, [], channel_mode=False)
    assert list(layers) == ["features.0", "features.3", "features.7", "classifier"]
    scores = score(scripted, "magnitude", channel_mode=False, example=digits[0][:1])
    masks = prune_unstructured(scripted, scores, 0.5, "layer", layers)
    assert abs(zero_fraction(scripted, masks) - 0.5) <= 0.01
    with torch.no_grad():
        scripted.classifier.weight.add_(1.0)
    apply_masks(scripted, masks)
    assert abs(zero_fraction(scripted, masks) - 0.5) <= 0.01
    assert scripted(digits[2][:4]).shape == (4, 10)


def test_bad_amount_and_scope_are_invalid_spec(tiny_cnn: TinyCNN) -> None:
    layers = prunable_layers(tiny_cnn, [], channel_mode=False)
    scores = {f"{name}.weight": module.weight.detach().abs() for name, module in layers.items()}
    with pytest.raises(InvalidSpec):
        prune_unstructured(tiny_cnn, scores, 1.0, "global", layers)
    with pytest.raises(InvalidSpec):
        prune_unstructured(tiny_cnn, scores, 0.5, "network", layers)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec):
        prune_unstructured(tiny_cnn, scores, 0.5, "global", {})


# --- channel --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "scope"),
    [
        ("resnet18", "global"),
        ("resnet18", "layer"),
        ("mobilenet_v3_small", "global"),
        ("mobilenet_v3_small", "layer"),
        ("vgg11", "global"),
    ],
)
def test_channel_pruning_shrinks_torchvision_models(arch: str, scope: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    ctx = RunContext()
    scores = score(model, "magnitude", channel_mode=True, example=example)
    report = prune_channels(model, example, scores, 0.5, scope, [], ctx)

    assert report.params_after < 0.6 * report.params_before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.channels_removed == round(0.5 * report.channels_prunable)
    assert report.head is not None and report.head not in report.layers
    assert sum(c.before - c.after for c in report.layers.values()) > 0
    assert all(c.after >= c.before * (1 - MAX_LAYER_PRUNING_RATIO) for c in report.layers.values())
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model(batch)
        assert output.shape == (2, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks jit.trace deprecated; export still needs it
            traced = torch.jit.trace(model, example)
        torch.testing.assert_close(traced(batch), output)


def test_channel_pruning_keeps_the_head_and_respects_exclude(tiny_cnn: TinyCNN, digits) -> None:
    example = digits[0][:1]
    scores = score(tiny_cnn, "magnitude", channel_mode=True, example=example)
    report = prune_channels(tiny_cnn, example, scores, 0.5, "global", ["features.0"], RunContext())
    assert report.head == "classifier"
    assert tiny_cnn.classifier.out_features == 10
    assert tiny_cnn.features[0].out_channels == 32 and tiny_cnn.features[1].num_features == 32
    assert set(report.layers) == {"features.3", "features.7"}
    assert report.channels["features.7"] == {"before": 128, "after": tiny_cnn.features[7].out_channels}
    assert report.layers["features.3"].after < report.layers["features.3"].before == 64
    assert tiny_cnn.classifier.in_features == tiny_cnn.features[7].out_channels < 128
    assert tiny_cnn(digits[2][:5]).shape == (5, 10)


def test_no_layer_collapses_past_the_cap(tiny_cnn: TinyCNN, digits) -> None:
    example = digits[0][:1]
    ctx = RunContext()
    scores = score(tiny_cnn, "magnitude", channel_mode=True, example=example)
    report = prune_channels(tiny_cnn, example, scores, 0.95, "layer", [], ctx)
    assert {name: c.after for name, c in report.layers.items()} == {"features.0": 4, "features.3": 7, "features.7": 13}
    assert any("90%" in warning for warning in ctx.warnings)


def test_channel_pruning_refuses_torchscript(tiny_cnn: TinyCNN, digits) -> None:
    scripted = script(tiny_cnn)
    with pytest.raises(UnsupportedCombination):
        prune_channels(scripted, digits[0][:1], {}, 0.5, "global", [], RunContext())


# --- BatchNorm recalibration ----------------------------------------------------------------------


def test_batchnorm_recalibration_recovers_accuracy_after_channel_pruning(tiny_cnn: TinyCNN, digits) -> None:
    train_x, train_y, test_x, test_y = digits
    original = top1(tiny_cnn, test_x, test_y)
    example = train_x[:1]
    prune_channels(tiny_cnn, example, score(tiny_cnn, "magnitude", channel_mode=True, example=example), 0.5, "global", [], RunContext())
    momenta = [m.momentum for m in tiny_cnn.modules() if isinstance(m, nn.BatchNorm2d)]
    pruned = top1(tiny_cnn, test_x, test_y)

    used = recalibrate_batchnorm(tiny_cnn, batches_of(train_x, train_y), RunContext(), max_batches=10)
    recalibrated = top1(tiny_cnn, test_x, test_y)

    assert used == 10
    assert original > 0.95
    assert pruned < original - 0.3, "pruning should hurt, or this test proves nothing"
    assert recalibrated > pruned + 0.2
    assert [m.momentum for m in tiny_cnn.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert not any(module.training for module in tiny_cnn.modules())


def test_recalibration_with_no_batches_keeps_the_old_statistics(tiny_cnn: TinyCNN) -> None:
    before = tiny_cnn.features[1].running_var.clone()
    with pytest.raises(InvalidDataset):
        recalibrate_batchnorm(tiny_cnn, lambda: iter(()), RunContext())
    assert torch.equal(tiny_cnn.features[1].running_var, before)


def test_an_architecture_torch_pruning_cannot_trace_is_a_clear_refusal() -> None:
    """shufflenet_v2's channel shuffle used to end the job as internal_error (a ZeroDivisionError
    inside Torch-Pruning's dependency graph); now it is unsupported_combination naming the field."""
    from compactor.spec import JobSpec
    from worker.compression.loading import LoadedModel
    from worker.compression.pipeline import BenchmarkOptions, compress

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 64, 64]}, "prune": {"granularity": "channel", "amount": 0.3}})
    loaded = LoadedModel(module=model, format="state_dict", scripted=False, arch="shufflenet_v2_x0_5")
    with pytest.raises(UnsupportedCombination, match="could not build one for this architecture") as refused:
        compress(loaded, spec, None, benchmark=BenchmarkOptions(warmup=1, runs=1, batch_sizes=(1,)))
    assert refused.value.field == "prune.granularity" and refused.value.code == "unsupported_combination"
    # The refusal names the way that works: unstructured pruning of the same model succeeds.
    unstructured = spec.model_copy(update={"prune": spec.prune.model_copy(update={"granularity": "unstructured"})})
    result = compress(loaded, unstructured, None, benchmark=BenchmarkOptions(warmup=1, runs=1, batch_sizes=(1,)))
    assert result.metrics["compressed"]["nonzero_params"] < result.metrics["original"]["nonzero_params"]


def test_a_dependency_walk_that_runs_away_is_stopped_before_it_takes_the_memory() -> None:
    """swin_t's window partition makes Torch-Pruning's group walk multiply its indices by the window
    size on every pass (2, 64, 2,048 ... 67 million): 24 GB and a killed worker before the bound.
    Now it is a clear refusal, early, and Torch-Pruning is left as it was for the next job."""
    import resource

    import torch_pruning as tp

    from compactor.spec import JobSpec
    from worker.compression.loading import LoadedModel
    from worker.compression.pipeline import BenchmarkOptions, compress

    flatten_call = tp.dependency.index_mapping._FlattenIndexMapping.__call__
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 3, 64, 64]}, "prune": {"granularity": "channel", "amount": 0.3}})
    loaded = LoadedModel(module=model, format="state_dict", scripted=False, arch="swin_t")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    with pytest.raises(UnsupportedCombination, match="ever more positions") as refused:
        compress(loaded, spec, None, benchmark=BenchmarkOptions(warmup=1, runs=1, batch_sizes=(1,)))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - peak_before
    assert refused.value.field == "prune.granularity" and "window attention" in str(refused.value)
    assert grown < 3 << 30, f"the walk was stopped only after the peak grew by {grown >> 20} MiB"
    assert tp.dependency.index_mapping._FlattenIndexMapping.__call__ is flatten_call
