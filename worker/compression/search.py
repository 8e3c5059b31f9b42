"""The target search: the largest prune amount whose accuracy stays within ``target.max_accuracy_drop``.

Bisection over the amount in (0, ``prune.amount``]; each point is a whole trial (every pass,
fine-tuning included) evaluated on the validation split. Every point tried is reported.
"""

from __future__ import annotations

from typing import Any

from compactor.catalogue import stage_weight
from compactor.jobs import Stage
from compactor.spec import JobSpec
from worker.compression.passes import Pass, Segment, build_passes, planned_segments, run_trial
from worker.compression.trial import Trial, Workbench

# Narrower than a percent of sparsity, another trial buys nothing.
RESOLUTION = 0.01


def _at_amount(spec: JobSpec, amount: float) -> JobSpec:
    assert spec.prune is not None
    return spec.model_copy(update={"prune": spec.prune.model_copy(update={"amount": amount})})


def passes_at(spec: JobSpec, amount: float, *, has_data: bool) -> list[Pass]:
    return build_passes(_at_amount(spec, amount), has_data=has_data)


def trial_segments(spec: JobSpec, *, has_data: bool) -> list[Segment]:
    """One search point's planned progress: its passes, then its evaluation."""
    segments = planned_segments(build_passes(spec, has_data=has_data))
    return [*segments, (Stage.evaluate, stage_weight(Stage.evaluate) / 2)]


def search(bench: Workbench, original_top1: float) -> tuple[Trial, dict[str, Any]]:
    spec = bench.spec
    assert spec.prune is not None and spec.target is not None
    has_data = not bench.data.synthetic
    budget = spec.target.max_accuracy_drop
    max_trials = spec.target.max_trials
    trial_weight = sum(weight for _, weight in trial_segments(spec, has_data=has_data))
    log: list[dict[str, Any]] = []
    low, high = 0.0, spec.prune.amount
    best_ok: Trial | None = None
    best_any: Trial | None = None
    amount = high
    tried: set[float] = set()
    for index in range(max_trials):
        amount = round(amount, 4)
        if amount in tried or amount <= 0:
            bench.plan.skip(trial_weight * (max_trials - index))
            break
        tried.add(amount)
        trial = run_trial(passes_at(spec, amount, has_data=has_data), bench, amount)
        with bench.stage(Stage.evaluate, stage_weight(Stage.evaluate) / 2):
            trial.accuracy = bench.evaluate_trial(trial)
        top1 = trial.accuracy["top1"] if trial.accuracy else 0.0
        drop = original_top1 - top1
        within = drop <= budget + 1e-9
        log.append({"amount": amount, "top1": top1, "accuracy_drop": round(drop, 6), "within_budget": within})
        if best_any is None or (best_any.accuracy or {}).get("top1", 0.0) < top1:
            best_any = trial
        if within:
            best_ok = trial if best_ok is None or trial.amount > best_ok.amount else best_ok
            low = amount
        else:
            high = amount
        if within and amount == spec.prune.amount:
            bench.plan.skip(trial_weight * (max_trials - index - 1))
            break
        amount = (low + high) / 2
        if high - low < RESOLUTION:
            bench.plan.skip(trial_weight * (max_trials - index - 1))
            break
    chosen = best_ok or best_any
    assert chosen is not None
    chosen_drop = original_top1 - ((chosen.accuracy or {}).get("top1", 0.0))
    summary = {
        "max_accuracy_drop": budget,
        "budget_met": best_ok is not None,
        "chosen_amount": chosen.amount,
        "accuracy_drop": round(chosen_drop, 6),
        "missed_by": None if best_ok is not None else round(chosen_drop - budget, 6),
        "points": log,
    }
    return chosen, summary
