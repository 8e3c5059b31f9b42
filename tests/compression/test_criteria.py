"""Importance criteria on the trained tiny CNN and real digits batches."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compactor.errors import Cancelled, InvalidSpec
from tests.support.models import TinyCNN, batches_of
from worker.compression.context import RunContext
from worker.compression.criteria import CRITERIA, Criterion, get_criterion, register_criterion
from worker.compression.pruning import ElementScoreImportance, prunable_layers, scoring_parameters

DEAD_CONV = "features.3"
DEAD_NORM = "features.4"
DEAD_CHANNEL = 17
SCORE_BATCHES = 4
RANKING_CRITERIA = ["magnitude", "gradient", "taylor", "hessian"]


def plant_dead_channel(model: TinyCNN) -> None:
    """Zero one filter and its BatchNorm scale and shift: the channel outputs exactly zero."""
    conv = model.get_submodule(DEAD_CONV)
    norm = model.get_submodule(DEAD_NORM)
    with torch.no_grad():
        conv.weight[DEAD_CHANNEL].zero_()
        norm.weight[DEAD_CHANNEL] = 0.0
        norm.bias[DEAD_CHANNEL] = 0.0


def channel_scores(model: TinyCNN, digits, criterion: str, *, labelled: bool = True) -> dict[str, torch.Tensor]:
    train_x, train_y, _, _ = digits
    layers = prunable_layers(model, [], channel_mode=True, example_inputs=train_x[:1])
    parameters = scoring_parameters(model, layers, channel_mode=True)
    batches = batches_of(train_x, train_y if labelled else None)
    return get_criterion(criterion).score(model, parameters, batches, RunContext(), SCORE_BATCHES)


def test_registry_holds_the_five_builtins() -> None:
    assert set(CRITERIA) == {"magnitude", "gradient", "taylor", "hessian", "random"}
    for name, cls in CRITERIA.items():
        assert cls.name == name
        assert isinstance(get_criterion(name), Criterion)
    assert {name for name, cls in CRITERIA.items() if cls.facts().needs_data} == {"gradient", "taylor", "hessian"}
    with pytest.raises(InvalidSpec) as caught:
        get_criterion("l1-norm")
    assert caught.value.field == "prune.criterion"


def test_a_name_cannot_be_registered_twice() -> None:
    class Impostor(CRITERIA["magnitude"]):  # type: ignore[misc, valid-type]
        name = "magnitude"

    with pytest.raises(ValueError):
        register_criterion(Impostor)
    assert CRITERIA["magnitude"] is not Impostor


@pytest.mark.parametrize("criterion", RANKING_CRITERIA)
def test_dead_filter_elements_score_lowest(tiny_cnn: TinyCNN, digits, criterion: str) -> None:
    plant_dead_channel(tiny_cnn)
    scores = channel_scores(tiny_cnn, digits, criterion)
    weight = tiny_cnn.get_submodule(DEAD_CONV).weight
    layer_scores = scores[f"{DEAD_CONV}.weight"]
    assert layer_scores.shape == weight.shape
    assert layer_scores.dtype == torch.float32 and layer_scores.device.type == "cpu"
    assert torch.all(layer_scores[DEAD_CHANNEL] == layer_scores.min())
    # The rest of the layer is really scored, so "lowest" is not a tie among zeros.
    assert layer_scores.median() > layer_scores.min()


@pytest.mark.parametrize("criterion", RANKING_CRITERIA)
def test_dead_channel_group_scores_lowest_on_the_dependency_graph(tiny_cnn: TinyCNN, digits, criterion: str) -> None:
    plant_dead_channel(tiny_cnn)
    scores = channel_scores(tiny_cnn, digits, criterion)
    graph = tp.DependencyGraph().build_dependency(tiny_cnn, example_inputs=digits[0][:1])
    conv = tiny_cnn.get_submodule(DEAD_CONV)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    # The group spans the filter, its BatchNorm and the next conv's inputs.
    members = {(type(item.dep.layer).__name__, graph.is_out_channel_pruning_fn(item.dep.handler)) for item in group}
    assert {("Conv2d", True), ("BatchNorm2d", True), ("Conv2d", False)} <= members

    importance = ElementScoreImportance(scores, tiny_cnn, graph)(group)
    assert importance is not None and importance.shape == (conv.out_channels,)
    assert importance[DEAD_CHANNEL] == importance.min()
    assert importance[DEAD_CHANNEL] < importance.median()
    # Normalized per group by its mean.
    assert importance.mean().item() == pytest.approx(1.0, rel=1e-4)


def test_unlabelled_batches_score_against_the_models_own_predictions(tiny_cnn: TinyCNN, digits) -> None:
    plant_dead_channel(tiny_cnn)
    scores = channel_scores(tiny_cnn, digits, "taylor", labelled=False)
    layer_scores = scores[f"{DEAD_CONV}.weight"]
    assert torch.all(layer_scores[DEAD_CHANNEL] == 0)
    assert layer_scores.sum() > 0


@pytest.mark.parametrize("criterion", ["gradient", "taylor", "hessian"])
def test_data_criteria_leave_modes_grads_and_weights_as_found(tiny_cnn: TinyCNN, digits, criterion: str) -> None:
    tiny_cnn.train()
    tiny_cnn.classifier.weight.requires_grad_(False)
    running_mean = tiny_cnn.features[1].running_mean.clone()
    weights = {name: parameter.detach().clone() for name, parameter in tiny_cnn.named_parameters()}
    channel_scores(tiny_cnn, digits, criterion)
    assert all(module.training for module in tiny_cnn.modules())
    assert all(parameter.grad is None for parameter in tiny_cnn.parameters())
    assert tiny_cnn.classifier.weight.requires_grad is False
    # Eval-mode scoring must not have moved the BatchNorm statistics.
    assert torch.equal(tiny_cnn.features[1].running_mean, running_mean)
    assert all(torch.equal(weights[name], parameter) for name, parameter in tiny_cnn.named_parameters())


def test_data_criteria_refuse_to_run_without_data(tiny_cnn: TinyCNN) -> None:
    parameters = {"classifier.weight": tiny_cnn.classifier.weight}
    with pytest.raises(InvalidSpec) as caught:
        get_criterion("hessian").score(tiny_cnn, parameters, None, RunContext(), 4)
    assert caught.value.field == "prune.criterion"


def test_scoring_checks_cancellation_between_batches(tiny_cnn: TinyCNN, digits) -> None:
    calls: list[int] = []

    def cancel_on_second_batch() -> bool:
        calls.append(1)
        return len(calls) >= 2

    ctx = RunContext(should_cancel=cancel_on_second_batch)
    parameters = {"classifier.weight": tiny_cnn.classifier.weight}
    with pytest.raises(Cancelled):
        get_criterion("gradient").score(tiny_cnn, parameters, batches_of(digits[0], digits[1]), ctx, 8)
    assert len(calls) == 2
    assert not any(module.training for module in tiny_cnn.modules())


def test_progress_is_reported_and_reaches_one(tiny_cnn: TinyCNN, digits) -> None:
    seen: list[tuple[str, float]] = []
    ctx = RunContext(progress=lambda stage, fraction: seen.append((stage, fraction)))
    parameters = {"classifier.weight": tiny_cnn.classifier.weight}
    get_criterion("taylor").score(tiny_cnn, parameters, batches_of(digits[0], digits[1]), ctx, 3)
    assert {stage for stage, _ in seen} == {"score"}
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_random_scores_are_seeded(tiny_cnn: TinyCNN) -> None:
    parameters = dict(tiny_cnn.named_parameters())
    first = get_criterion("random", seed=3).score(tiny_cnn, parameters, None, RunContext(), 1)
    again = get_criterion("random", seed=3).score(tiny_cnn, dict(reversed(list(parameters.items()))), None, RunContext(), 1)
    other = get_criterion("random", seed=4).score(tiny_cnn, parameters, None, RunContext(), 1)
    assert all(first[name].shape == parameter.shape for name, parameter in parameters.items())
    assert all(torch.equal(first[name], again[name]) for name in parameters)
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])


def test_hessian_is_half_fisher_times_weight_squared(digits) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_x, train_y, _, _ = digits
    weight = model[1].weight
    scores = get_criterion("hessian").score(model, {"1.weight": weight}, batches_of(train_x, train_y), RunContext(), 2)
    fisher = torch.zeros_like(weight)
    for start in (0, 64):
        loss = nn.functional.cross_entropy(model(train_x[start : start + 64]), train_y[start : start + 64])
        fisher += torch.autograd.grad(loss, weight)[0].square() / 2
    torch.testing.assert_close(scores["1.weight"], 0.5 * fisher * weight.detach().square())


def test_group_importance_averages_filter_norm_and_next_layer_inputs(tiny_cnn: TinyCNN, digits) -> None:
    scores = channel_scores(tiny_cnn, digits, "magnitude")
    graph = tp.DependencyGraph().build_dependency(tiny_cnn, example_inputs=digits[0][:1])
    conv = tiny_cnn.get_submodule(DEAD_CONV)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    importance = ElementScoreImportance(scores, tiny_cnn, graph)(group)

    filters = tiny_cnn.features[3].weight.detach().abs().flatten(1).sum(1)
    norm_scale = tiny_cnn.features[4].weight.detach().abs()
    next_inputs = tiny_cnn.features[7].weight.detach().abs().sum(dim=(0, 2, 3))
    expected = (filters + norm_scale + next_inputs) / 3
    torch.testing.assert_close(importance, expected / expected.mean())
