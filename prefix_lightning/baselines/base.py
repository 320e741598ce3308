"""What the fine-tuning baselines share: the method interface around an LM that trains the way its users run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from prefix_lightning.files import give_new_file_mode
from prefix_lightning.methods import target_loss


class FineTunedLM(nn.Module):
    """An LM adapted by fine-tuning some of its own weights (or a PEFT adapter): the method interface
    (``prefix_lightning.methods.TrainableLM``), so that one training loop, one loss and one decoding path serve
    every method and a comparison differs in the method only.

    Unlike ``PrefixModel``, which keeps its frozen LM in eval mode, these methods train the way their users run
    them: in train mode the LM's own dropout (and LoRA's) is on, since that is the baseline the paper and PEFT's
    users compare against. ``.lm`` is the model that runs: the LM itself, or the ``PeftModel`` around it.
    Subclasses choose what trains and write ``save``.
    """

    virtual_positions = 0

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.train(lm.training)

    def loss(self, labels: torch.Tensor, length_groups: int | None = None, **inputs: Any) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens, the loss of every method (see :func:`target_loss`)."""
        return target_loss(self.lm, labels, length_groups, **inputs)

    def forward(self, **inputs: Any) -> Any:
        return self.lm(**inputs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        # `generate` is GenerationMixin's, which PreTrainedModel does not declare.
        return self.lm.generate(**kwargs)  # type: ignore[operator]

    def enable_gradient_checkpointing(self) -> None:
        """transformers' own checkpointing of the LM's layers (non-reentrant, so that no input needs a gradient);
        these methods train in train mode, where transformers checkpoints."""
        self.lm.activation_checkpointing_enable({"use_reentrant": False})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError(f"{type(self).__name__} does not say how to export what it trains")

    def _save_pretrained(self, path: str | Path, **options: Any) -> Path:
        """``save_pretrained`` into ``path``, its weight files with a new file's mode (safetensors writes them
        0600, unreadable by the other users of a shared machine or a container)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(folder, **options)
        give_new_file_mode(*folder.glob("*.safetensors"))
        return folder
