"""Structured (channel) pruning through Torch-Pruning's dependency graph.

Whole filters are removed together with everything that depends on them (the
BatchNorm after them, the next layer's inputs, residual partners), so the
architecture, the MACs and the file really shrink. Our element scores reach
Torch-Pruning through ``ElementScoreImportance``; the choice of channels is
ours (exact counts, a per-layer cap, no tie overshoot) rather than MetaPruner's,
whose global threshold prunes every channel tied with it and has no per-layer
cap within one step.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from compactor.compat import channel_pruning_refused
from compactor.errors import CompressionFailed, InvalidSpec, UnsupportedCombination
from compactor.jobs import Stage
from worker.compression.context import RunContext, is_memory_exhaustion
from worker.compression.pruning.layers import find_head, is_weighted_layer, out_channels, prunable_layers

Scope = Literal["global", "layer"]
PRUNE_STAGE = Stage.prune
# No layer loses more than this fraction of its channels in one call, so none collapses.
MAX_LAYER_PRUNING_RATIO = 0.9


@dataclass(frozen=True)
class LayerChannels:
    before: int
    after: int


@dataclass
class ChannelPruneReport:
    """What one channel-pruning call did. ``layers`` covers every prunable layer, pruned or not."""

    head: str | None
    layers: dict[str, LayerChannels] = field(default_factory=dict)
    channels_removed: int = 0
    channels_prunable: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def channels(self) -> dict[str, dict[str, int]]:
        """``layers`` as plain dicts ({"before", "after"}), the shape the job report uses."""
        return {name: {"before": counts.before, "after": counts.after} for name, counts in self.layers.items()}


def _per_channel(score: torch.Tensor, module: nn.Module, out_side: bool) -> torch.Tensor | None:
    """Sum an element-score tensor over everything that goes with one channel of ``module``.

    ``out_side`` picks the output-channel dimension (the module's own filters)
    or the input-channel dimension (the weights that read a pruned channel).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = module.groups
        if module.transposed:
            # ConvTranspose weights are [in, out/groups, ...].
            if out_side:
                per_group_in = score.shape[0] // groups
                return score.reshape(groups, per_group_in, score.shape[1], -1).sum(dim=(1, 3)).flatten()
            return score.flatten(1).sum(1)
        if out_side:
            return score.flatten(1).sum(1)
        # Input channel c of a grouped conv is read by the filters of group c // (in/groups), at column c % (in/groups).
        per_group_out = score.shape[0] // groups
        return score.reshape(groups, per_group_out, score.shape[1], -1).sum(dim=(1, 3)).flatten()
    if isinstance(module, nn.Linear):
        return score.sum(1) if out_side else score.sum(0)
    if score.dim() == 1:
        # Norm layers: one scale per channel, the same on either side.
        return score
    return None


class ElementScoreImportance(tp.importance.Importance):
    """Group importance from element scores, for Torch-Pruning.

    For each dependent layer in a group it sums our scores over the pruned
    dimension (out-channels for prune_out_channels, in-channels for
    prune_in_channels, the scale for norm layers), averages the layers per
    channel and divides by the group mean, like GroupMagnitudeImportance with
    normalizer="mean", so channels of layers with very different score scales
    can share one global ranking.
    """

    def __init__(self, scores: dict[str, torch.Tensor], model: nn.Module, graph: tp.DependencyGraph) -> None:
        self.scores = scores
        self.graph = graph
        self.module_names = {module: name for name, module in model.named_modules()}

    def _score_of(self, module: nn.Module) -> torch.Tensor | None:
        name = self.module_names.get(module)
        if name is None:
            return None
        weight = getattr(module, "weight", None)
        score = self.scores.get(f"{name}.weight" if name else "weight")
        if score is None or not isinstance(weight, torch.Tensor):
            return None
        if score.shape != weight.shape:
            raise CompressionFailed(
                f"score for {name}.weight has shape {tuple(score.shape)} but the weight is {tuple(weight.shape)}; "
                "score the model again after every pruning step"
            )
        return score.detach().to(device="cpu", dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        count: torch.Tensor | None = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            root_idxs = item.root_idxs
            if any(index is None for index in root_idxs):
                continue
            module = dep.layer
            if not isinstance(module, nn.Module):
                continue
            score = self._score_of(module)
            if score is None:
                continue
            out_side = self.graph.is_out_channel_pruning_fn(dep.handler)
            if not out_side and not self.graph.is_in_channel_pruning_fn(dep.handler):
                continue
            per_channel = _per_channel(score, module, out_side)
            if per_channel is None or not idxs or max(idxs) >= per_channel.numel():
                continue
            if total is None:
                size = len(group[0].idxs)
                total = torch.zeros(size, dtype=torch.float32)
                count = torch.zeros(size, dtype=torch.float32)
            root = torch.tensor(root_idxs, dtype=torch.long)
            total.index_add_(0, root, per_channel[torch.tensor(idxs, dtype=torch.long)])
            count.index_add_(0, root, torch.ones(len(root_idxs)))
        if total is None or count is None:
            return None
        importance = total / count.clamp_min(1.0)
        mean = importance.mean()
        return importance / mean if mean > 0 else importance


def _dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``; an architecture it cannot trace is a clear
    refusal naming why, not a crash of the job (shufflenet_v2's channel shuffle, a view that
    folds channels into groups, ends in a ZeroDivisionError inside Torch-Pruning 1.6.1)."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as error:  # Torch-Pruning fails in many ways on what it cannot trace
        if is_memory_exhaustion(error) or isinstance(error, _IndexExplosion):
            raise  # the job's memory limit, or the walk bound, each reported as such
        cause = str(error).splitlines()[0][:200] if str(error) else ""
        raise UnsupportedCombination(
            "channel pruning needs a dependency graph of the model, and Torch-Pruning could not build one for this "
            f"architecture ({type(error).__name__}{': ' + cause if cause else ''}; reshapes that fold channels into "
            "groups, like shufflenet's channel shuffle, are the usual cause): use prune.granularity 'unstructured', "
            "or quantize without channel pruning",
            field="prune.granularity",
        ) from error


# A dependency walk touches at most a few positions per weight of the largest layer (measured on the
# zoo: at most 0.17 of the largest parameter's elements, vit_b_16), so 4x that plus a floor is far
# beyond every real group and far below the 20-70 million indices at which swin_t and maxvit_t's
# walks were stopped on their way to 24 GB.
INDEX_BUDGET_PER_LARGEST_PARAMETER = 4
INDEX_BUDGET_FLOOR = 1 << 20


class _IndexExplosion(Exception):
    def __init__(self, reached: int, budget: int) -> None:
        super().__init__(f"{reached:,} channel positions in one group, beyond the budget of {budget:,}")
        self.reached, self.budget = reached, budget


@contextlib.contextmanager
def _bounded_dependency_walks(model: nn.Module) -> Iterator[None]:
    """Stop Torch-Pruning's group walks that run away, before they take the machine's memory.

    Its reshape index mapping treats a reshape that folds spatial positions into the channel axis
    (swin's and maxvit's window partitions) as a flatten, and each pass around the graph multiplies
    the indices by the window size: 2, 64, 2,048 ... 67 million, 24 GB. Torch-Pruning 1.6 has no
    bound of its own, so its two growth points (a flatten's expansion and a group's new dependency)
    are bounded here, for the duration of one pruning call.
    """
    largest = max((parameter.numel() for parameter in model.parameters()), default=0)
    budget = max(INDEX_BUDGET_FLOOR, INDEX_BUDGET_PER_LARGEST_PARAMETER * largest)
    flatten = tp.dependency.index_mapping._FlattenIndexMapping
    group = tp.dependency.group.Group
    expand, add_dep = flatten.__call__, group.add_dep

    def bounded_expand(self: Any, idxs: list[Any]) -> Any:
        if not self.reverse and len(idxs) * self._stride > budget:
            raise _IndexExplosion(len(idxs) * self._stride, budget)
        return expand(self, idxs)

    def bounded_add_dep(self: Any, dep: Any, idxs: list[Any]) -> None:
        total = getattr(self, "_compactor_positions", 0) + len(idxs)
        if total > budget:
            raise _IndexExplosion(total, budget)
        self._compactor_positions = total
        add_dep(self, dep, idxs)

    flatten.__call__, group.add_dep = bounded_expand, bounded_add_dep  # type: ignore[method-assign]
    try:
        yield
    finally:
        flatten.__call__, group.add_dep = expand, add_dep  # type: ignore[method-assign]


def _index_explosion_refused(error: _IndexExplosion) -> UnsupportedCombination:
    return UnsupportedCombination(
        "channel pruning could not group this architecture's channels: Torch-Pruning's dependency graph maps them "
        f"through its reshapes into ever more positions ({error}; reshapes that fold spatial windows into the "
        "channel axis, like swin's and maxvit's window attention, are the usual cause): use prune.granularity "
        "'unstructured', or quantize without channel pruning",
        field="prune.granularity",
    )


def _has_grouped_conv(group: tp.dependency.Group) -> bool:
    """True where a grouped (not depthwise) conv is involved: Torch-Pruning cannot keep its groups even."""
    for item in group:
        module = item.dep.layer
        if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
            continue
        if not (module.groups == module.in_channels == module.out_channels):  # grouped, not depthwise
            return True
    return False


def _choose_channels(importances: list[torch.Tensor], amount: float, scope: Scope) -> list[torch.Tensor]:
    """Indices to remove per group: ``amount`` of all channels, no group past the cap, ties by position."""
    caps = [min(imp.numel() - 1, int(imp.numel() * MAX_LAYER_PRUNING_RATIO)) for imp in importances]
    if scope == "layer":
        return [torch.argsort(imp, stable=True)[: min(cap, round(amount * imp.numel()))] for imp, cap in zip(importances, caps, strict=True)]
    total = sum(imp.numel() for imp in importances)
    wanted = round(amount * total)
    values = torch.cat(importances)
    owners = [group for group, imp in enumerate(importances) for _ in range(imp.numel())]
    positions = [position for imp in importances for position in range(imp.numel())]
    chosen: list[list[int]] = [[] for _ in importances]
    taken = 0
    for flat_index in torch.argsort(values, stable=True).tolist():
        if taken >= wanted:
            break
        owner = owners[flat_index]
        if len(chosen[owner]) < caps[owner]:
            chosen[owner].append(positions[flat_index])
            taken += 1
    return [torch.tensor(sorted(indices), dtype=torch.long) for indices in chosen]


class _Snapshot:
    """What Torch-Pruning replaces in a module (its parameter and buffer objects, its channel
    counts), kept by reference so a pruning can be undone in place; module identity stays."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._saved = [
            (
                module,
                dict(module._parameters),
                dict(module._buffers),
                {key: value for key, value in vars(module).items() if isinstance(value, (int, float, bool, tuple))},
            )
            for module in modules
        ]

    def restore(self) -> None:
        for module, parameters, buffers, attributes in self._saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            vars(module).update(attributes)


Plan = tuple[nn.Module, Callable[..., nn.Module], torch.Tensor]


def _prune_groups(graph: tp.DependencyGraph, plans: list[Plan], ctx: RunContext) -> int:
    removed = 0
    for number, (module, handler, indices) in enumerate(plans):
        ctx.check_cancelled()
        pruning_group = graph.get_pruning_group(module, handler, indices.tolist())
        if not graph.check_pruning_group(pruning_group):
            ctx.warn("a channel group was skipped because pruning it would empty a layer")
            continue
        pruning_group.prune()
        removed += indices.numel()
        ctx.report(PRUNE_STAGE, (number + 1) / len(plans))
    return removed


def _prune_groups_checked(model: nn.Module, example: torch.Tensor, plans: list[Plan], ctx: RunContext) -> int:
    """Group by group, each undone where the model no longer runs after it; named in a warning."""
    names = {module: name for name, module in model.named_modules()}
    graph = _dependency_graph(model, example)
    removed = 0
    kept: list[str] = []
    for number, (module, handler, indices) in enumerate(plans):
        ctx.check_cancelled()
        pruning_group = graph.get_pruning_group(module, handler, indices.tolist())
        if not graph.check_pruning_group(pruning_group):
            continue
        touched = _Snapshot({item.dep.target.module for item in pruning_group if isinstance(item.dep.target.module, nn.Module)})
        pruning_group.prune()
        if _failure_to_run(model, example) is None:
            removed += indices.numel()
        else:
            touched.restore()
            kept.append(names.get(module, type(module).__name__))
            # Torch-Pruning's concat/split bookkeeping saw the undone pruning: trace again.
            graph = _dependency_graph(model, example)
        ctx.report(PRUNE_STAGE, (number + 1) / len(plans))
    if kept:
        ctx.warn(
            f"the channels of {', '.join(kept[:8])}{f' and {len(kept) - 8} more' if len(kept) > 8 else ''} were kept whole: "
            "removing them breaks shape arithmetic the model computes from channel counts (attention heads, reshape constants)"
        )
    return removed


def _failure_to_run(model: nn.Module, example_inputs: torch.Tensor) -> Exception | None:
    try:
        # A GraphModule prints the failing line of its code to stderr before raising; the
        # failure is expected here and handled, so it is not a job log's business.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            model(example_inputs)
    except Exception as error:  # whatever the model's own code raises on the new shapes
        if is_memory_exhaustion(error):
            raise
        return error
    return None


def _check_still_runs(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """Torch-Pruning resizes layers, not the shape arithmetic in a model's own code; what pruning
    group by group could not keep running is a clear refusal, not a crash later."""
    error = _failure_to_run(model, example_inputs)
    if error is not None:
        raise UnsupportedCombination(
            "after removing channels the model no longer runs "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}): its code computes shapes "
            "from channel counts (attention heads, reshape constants) that pruning cannot rewrite in Python code. Upload it "
            "as a torch.export archive (.pt2) or TorchScript, whose graph records those shapes, exclude the affected layers "
            "with prune.exclude, or use prune.granularity 'unstructured'",
            field="prune.granularity",
        ) from error


def _count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def prune_channels(
    model: nn.Module,
    example_inputs: torch.Tensor,
    scores: dict[str, torch.Tensor],
    amount: float,
    scope: Scope,
    exclude: list[str],
    ctx: RunContext,
) -> ChannelPruneReport:
    """Remove ``amount`` of the model's current prunable channels, in place.

    ``scores`` are element scores by parameter name for the model as it is now
    (see ``scoring_parameters(..., channel_mode=True)``). The classifier head
    keeps its outputs; layers matching ``exclude`` keep their filters (their
    inputs still shrink when the layer feeding them is pruned, like the head's).
    ``global`` ranks all channels together (scores normalized per group),
    ``layer`` removes the same fraction from every group. No layer loses more
    than ``MAX_LAYER_PRUNING_RATIO`` of its channels in one call.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedCombination(channel_pruning_refused("torchscript"), field="prune.granularity")
    if not 0.0 <= amount < 1.0:
        raise InvalidSpec(f"prune.amount must be in [0, 1), got {amount}", field="prune.amount")
    if scope not in ("global", "layer"):
        raise InvalidSpec(f"prune.scope must be 'global' or 'layer', got {scope!r}", field="prune.scope")

    layers = prunable_layers(model, exclude, channel_mode=True, example_inputs=example_inputs)
    head_and_excluded = [module for name, module in model.named_modules() if is_weighted_layer(module) and name not in layers]
    head = find_head(model, example_inputs)
    report = ChannelPruneReport(head=head, params_before=_count_parameters(model))
    before = {name: out_channels(module) for name, module in layers.items()}

    device = next(iter(model.parameters())).device
    modes = {module: module.training for module in model.modules()}
    walks = contextlib.ExitStack()
    try:
        model.eval()
        walks.enter_context(_bounded_dependency_walks(model))
        graph = _dependency_graph(model, example_inputs.to(device))
        importance = ElementScoreImportance(scores, model, graph)
        roots: list[tuple[nn.Module, Callable[..., nn.Module]]] = []
        importances: list[torch.Tensor] = []
        for group in graph.get_all_groups(ignored_layers=head_and_excluded, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
            ctx.check_cancelled()
            if _has_grouped_conv(group):
                ctx.warn("channels read by grouped convolutions are not pruned (their groups must stay even)")
                continue
            group_importance = importance(group)
            if group_importance is None or group_importance.numel() < 2:
                continue
            roots.append((group[0].dep.target.module, group[0].dep.handler))
            importances.append(group_importance)
        report.channels_prunable = sum(imp.numel() for imp in importances)

        chosen = _choose_channels(importances, amount, scope)
        wanted = round(amount * report.channels_prunable)
        plans = [(module, handler, indices) for (module, handler), indices in zip(roots, chosen, strict=True) if indices.numel()]
        before_pruning = _Snapshot(model.modules())
        report.channels_removed = _prune_groups(graph, plans, ctx)
        example = example_inputs.to(device)
        if report.channels_removed and _failure_to_run(model, example) is not None:
            # Some group feeds shape arithmetic (a reshape into heads, a literal channel count):
            # start again and keep each group that breaks the forward pass whole.
            before_pruning.restore()
            report.channels_removed = _prune_groups_checked(model, example, plans, ctx)
            if report.channels_removed:
                _check_still_runs(model, example)
    except _IndexExplosion as error:
        raise _index_explosion_refused(error) from error
    finally:
        walks.close()
        for module, training in modes.items():
            module.training = training
    if report.channels_removed < wanted:
        ctx.warn(
            f"removed {report.channels_removed} of the {wanted} channels asked for: "
            f"no layer loses more than {MAX_LAYER_PRUNING_RATIO:.0%} of its channels in one step"
        )
    report.layers = {name: LayerChannels(before[name], out_channels(module)) for name, module in layers.items()}
    report.params_after = _count_parameters(model)
    ctx.report(PRUNE_STAGE, 1.0)
    return report
