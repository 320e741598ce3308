"""The learning-rate schedule: linear warmup, then linear decay to 0 at the last step (transformers'
``get_linear_schedule_with_warmup``), with the number of steps asked for only once training has begun."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total_steps: Callable[[], float]) -> LambdaLR:
    """``total_steps`` is called at the first step past the start, not now: with a budget in epochs, Lightning
    counts the steps by building the training loader's iterator, which (before a resumed run's loops are restored
    and with loader workers taking their indices at once) would start the resumed epoch in the wrong place."""
    total: list[float] = []

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step == 0:  # no warmup: (T - 0) / T for every T
            return 1.0
        if not total:
            total.append(max(1, total_steps()))
        return max(0.0, (total[0] - step) / max(1, total[0] - warmup))

    return LambdaLR(optimizer, factor)
