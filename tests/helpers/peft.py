"""Putting one of our prefixes into a PEFT prefix-tuning model, so that tests compare the two on equal values."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel

from prefix_lightning.prefix.peft_format import peft_table


def set_peft_prefix(model: PeftModel, key_values: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give a PEFT prefix without MLP (inference mode, PEFT's saved form, or ``prefix_projection=False``) the
    values of one of our prefixes: ``PrefixModel.prefix_key_values()``, per attention module in layer order."""
    encoder = model.prompt_encoder[model.active_adapter]
    table = encoder.embedding.weight
    with torch.no_grad():
        table.copy_(peft_table(list(key_values.values())).reshape(table.shape))
