"""Decoding with a PEFT prefix-tuning model that really uses its prefix.

Under transformers 5, ``PeftModel.generate`` hands the prefix over as ``past_key_values``, which ``generate``
ignores in favour of its own ``cache``: the prefix is silently dropped and the model decodes as the bare LM.
PEFT's prefix *is* a pre-filled key/value cache, so here it is given to transformers' ``generate`` as one: the
cache holds the L prefix positions for every row generate will run (each beam its own copy, as PEFT does), and
L placeholder tokens stand in front of the prompt so that generate takes them as already processed. The
attention mask shows them and the real tokens take positions L, L+1, ..., as in PEFT's training forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from prefix_lightning.model import rows_per_input


@torch.no_grad()
def peft_generate(
    model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generation: Any
) -> torch.Tensor:
    """``generate`` for a causal LM with a PEFT prefix; returns prompt + new tokens, like ``generate``."""
    length = model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    cache = model.get_prompt(batch * rows_per_input(model.base_model.generation_config, generation))
    placeholders = input_ids.new_full((batch, length), generation.get("pad_token_id") or 0)
    output = model.base_model.generate(
        input_ids=torch.cat([placeholders, input_ids], dim=1),
        attention_mask=torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1),
        cache=cache,
        **generation,
    )
    return output[:, length:]


def set_peft_prefix(model: PeftModel, prefix: torch.Tensor) -> None:
    """Give an inference-mode PEFT prefix (PEFT's saved form: the MLP dropped) the values of one of our exported
    prefixes: ours is (layers, 2, kv_heads, L, head_dim), PEFT's table (L, layers * 2 * kv_heads * head_dim)."""
    table = model.prompt_encoder[model.active_adapter].embedding.weight
    with torch.no_grad():
        table.copy_(prefix.permute(3, 0, 1, 2, 4).reshape(table.shape))
