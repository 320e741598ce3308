"""Invariant 5, checked the same way wherever a prefix model is built (float or quantized LM)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prefix_lightning import PrefixModel
from prefix_lightning.prefix.attention import record_attention_calls


def assert_checkpointing_keeps_gradients(model: PrefixModel, loss: Callable[[], torch.Tensor]) -> None:
    """With gradient checkpointing the prefix gets the same gradients from ``loss()``, and the layers really run
    twice (their attention is called again in backward)."""

    def gradients() -> tuple[list[torch.Tensor], int]:
        model.zero_grad()
        with record_attention_calls() as calls:
            loss().backward()
        return [p.grad.clone() for p in model.trainable_parameters()], len(calls)

    plain, plain_calls = gradients()
    model.enable_gradient_checkpointing()
    checkpointed, checkpointed_calls = gradients()
    assert checkpointed_calls == 2 * plain_calls
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
