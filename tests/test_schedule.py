"""The learning-rate schedule: transformers' linear warmup and decay, its length asked for only once training runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_linear_schedule_with_warmup

from prefix_lightning.training.schedule import linear_warmup_decay


def _rates(make: Callable[[torch.optim.Optimizer], LRScheduler], steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule, rates = make(optimizer), []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 10), (3, 10), (3, 3), (5, 2)])
def test_the_schedule_is_transformers_linear_schedule(warmup: int, total: int) -> None:
    ours = _rates(lambda optimizer: linear_warmup_decay(optimizer, warmup, lambda: total), total + 3)
    theirs = _rates(lambda optimizer: get_linear_schedule_with_warmup(optimizer, warmup, total), total + 3)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_the_number_of_steps_is_asked_for_once_after_the_first_step() -> None:
    asked: list[int] = []
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = linear_warmup_decay(optimizer, 0, lambda: asked.append(1) or 10)
    assert not asked  # made, and its first rate given, without the count
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert asked == [1] and schedule.get_last_lr()[0] == pytest.approx(0.7)
