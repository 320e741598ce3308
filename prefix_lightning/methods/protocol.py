"""What the training layer needs of a method: the one interface every way of adapting the LM implements."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel


class TrainableLM(Protocol):
    """An LM adapted by one method: prefix-tuning (``PrefixModel``) or a baseline (``prefix_lightning.baselines``).

    A method is one class with this interface plus one ``conf/method/<name>.yaml`` that builds it by
    ``_target_`` (the LM, and the tokenizer where the class takes one, are passed at build time).
    """

    @property
    def lm(self) -> PreTrainedModel:
        """The transformers model that runs (its config, its generation defaults)."""
        ...

    @property
    def virtual_positions(self) -> int:
        """Positions that virtual tokens take in front of the real ones (the source budget leaves room for them)."""
        ...

    def loss(self, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens (``labels != IGNORE_INDEX``)."""
        ...

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` contract: prompt + new tokens for causal LMs, new tokens for encoder-decoders."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates and checkpoints keep."""
        ...

    def save(self, path: str | Path) -> Path:
        """Export what the method trained, in the form its users load, into the folder ``path``."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LM's layers in backward instead of storing their activations (or say why not)."""
        ...

    def __call__(self, **inputs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...
