"""The learning-rate schedule: transformers' linear warmup and decay, its length asked for only once training runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_linear_schedule_with_warmup

from prefix_lightning.training.build import build_model, build_module
from prefix_lightning.training.schedule import linear_warmup_decay
from tests.helpers.config import compose_train


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


def test_the_run_optimizes_the_methods_tensors_alone_with_its_configured_rate_decay_and_warmup(tmp_path: Path) -> None:
    """The optimizer and schedule a run gets from its config (a dropped setting would train with defaults)."""
    settings = ["model=tiny_llama", "method.lr=0.01", "optim.weight_decay=0.1", "optim.warmup_steps=2"]
    cfg = compose_train(tmp_path, settings)
    model, tokenizer = build_model(cfg)
    configured = build_module(cfg, model, tokenizer).configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.trainable_parameters()]
    assert (group["weight_decay"], schedule["interval"]) == (0.1, "step")
    assert schedule["scheduler"].get_last_lr() == [0.0]  # warming up: the step count is not needed yet
    optimizer.step()
    schedule["scheduler"].step()
    assert schedule["scheduler"].get_last_lr() == pytest.approx([0.005])
