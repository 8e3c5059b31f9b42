"""Importance criteria, registered by name.

    from worker.compression.criteria import get_criterion
    scores = get_criterion("taylor").score(model, parameters, batches, ctx, max_batches=8)

A new criterion is its facts in ``compactor/catalogue.py``, the literal in
``compactor/spec.py``, one file with a ``Criterion`` subclass and one
``register_criterion`` line below; registration refuses a name the catalogue
does not declare.
"""

from __future__ import annotations

from typing import Any

from compactor.catalogue import CRITERIA as CRITERION_FACTS
from compactor.errors import InvalidSpec
from worker.compression.criteria.base import Criterion
from worker.compression.criteria.gradient import GradientCriterion
from worker.compression.criteria.hessian import HessianCriterion
from worker.compression.criteria.magnitude import MagnitudeCriterion
from worker.compression.criteria.random import RandomCriterion
from worker.compression.criteria.taylor import TaylorCriterion

CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Register a Criterion subclass under its ``name``; usable as a class decorator."""
    if cls.name not in CRITERION_FACTS:
        raise ValueError(f"criterion {cls.name!r} is not declared in compactor.catalogue.CRITERIA")
    existing = CRITERIA.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"criterion name {cls.name!r} is already taken by {existing.__qualname__}")
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **options: Any) -> Criterion:
    """A fresh instance of the named criterion; ``options`` go to its constructor (e.g. seed=)."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise InvalidSpec(
            f"unknown prune.criterion {name!r}; choose one of {', '.join(sorted(CRITERIA))}",
            field="prune.criterion",
        ) from None
    return cls(**options)


register_criterion(MagnitudeCriterion)
register_criterion(GradientCriterion)
register_criterion(TaylorCriterion)
register_criterion(HessianCriterion)
register_criterion(RandomCriterion)

__all__ = ["CRITERIA", "Criterion", "get_criterion", "register_criterion"]
