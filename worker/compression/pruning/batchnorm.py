"""Re-estimating BatchNorm statistics after channel pruning.

Removing channels changes what every later layer sees, so the running means
and variances recorded on the original network no longer describe the pruned
one; re-estimating them is nearly free and recovers much of the lost accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.errors import InvalidDataset
from worker.compression.context import BatchSource, RunContext, limited


def recalibrate_batchnorm(model: nn.Module, batches: BatchSource, ctx: RunContext, max_batches: int = 50) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on up to ``max_batches`` batches.

    The estimate is a cumulative average (momentum=None), so each batch counts
    equally whatever their number. Only the BatchNorm layers run in train mode:
    dropout stays off so it cannot skew the statistics. Momentum and every
    module's mode are restored afterwards; on any error (cancellation included)
    the old statistics are restored too. Returns the number of batches used.
    It reports no progress of its own: it runs after ``prune`` reached 1.0 and
    is quick, and a second fraction under that stage would run backwards.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    saved = {norm: {key: value.clone() for key, value in norm.state_dict().items() if key.startswith(("running", "num_batches"))} for norm in norms}
    device = next(iter(model.parameters())).device
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for inputs, _ in limited(batches, max_batches):
                ctx.check_cancelled()
                model(inputs.to(device))
                used += 1
        if used == 0:
            raise InvalidDataset("the dataset yielded no batches to recalibrate BatchNorm with")
    except BaseException:
        for norm in norms:
            for key, value in saved[norm].items():
                getattr(norm, key).copy_(value)
        raise
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return used
