"""PEFT's prefix tuning as a baseline: its config from our prefix settings, and a decoding path that uses its prefix.

Under transformers 5, ``PeftModel.generate`` hands the prefix over as ``past_key_values``, which ``generate``
ignores in favour of its own ``cache``: the prefix is silently dropped and the model decodes as the bare LM.
PEFT's prefix *is* a pre-filled key/value cache, so here it is given to transformers' ``generate`` as one: the
cache holds the L prefix positions for every row generate will run (each beam its own copy, as PEFT does), and
L placeholder tokens stand in front of the prompt so that generate takes them as already processed. The
attention mask shows them and the real tokens take positions L, L+1, ..., as in PEFT's training forward.

peft is an optional dependency (extras ``peft``, ``dev``): it is imported only when a function needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from prefix_lightning.baselines.peft_adapter import PeftAdapter, require_peft
from prefix_lightning.decoding import rows_per_input
from prefix_lightning.prefix import PrefixConfig

if TYPE_CHECKING:
    from peft import PeftModel, PrefixTuningConfig


class PeftPrefixTuning(PeftAdapter):
    """PEFT's own prefix tuning, the peer to compare with, at our prefix's settings (``config``: the same
    length, reparametrization and MLP width). Causal LMs only."""

    method = "peft_prefix"

    def __init__(self, lm: PreTrainedModel, config: PrefixConfig | Mapping[str, Any] | None = None) -> None:
        _require_causal(lm)
        require_peft(self.method)
        prefix = PrefixConfig.of(config)
        super().__init__(lm, peft_prefix_config(prefix))

    @classmethod
    def from_export(cls, lm: PreTrainedModel, path: str | Path) -> PeftPrefixTuning:
        _require_causal(lm)
        adapter = super().from_export(lm, path)
        assert isinstance(adapter, PeftPrefixTuning)
        return adapter

    def _wrap(self, lm: PreTrainedModel, peft_model: Any) -> None:
        super()._wrap(lm, peft_model)
        self.virtual_positions = peft_model.active_peft_config.num_virtual_tokens  # PEFT always shifts by L

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        """Through :func:`peft_generate`: PEFT's own ``generate`` drops the prefix under transformers 5."""
        return peft_generate(self.lm, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        raise ValueError(
            "PEFT's prefix tuning does not work with gradient checkpointing (its prefix travels as a key/value "
            "cache, which checkpointed layers do not support): set model.gradient_checkpointing=false"
        )


def _require_causal(lm: PreTrainedModel) -> None:
    if lm.config.is_encoder_decoder:
        raise ValueError(
            f"peft_prefix covers causal LMs only, not {type(lm).__name__}: PEFT's encoder-decoder prefix "
            "generates without its prefix under transformers 5 and has no working decoding path here"
        )


def peft_prefix_config(prefix: PrefixConfig) -> PrefixTuningConfig:
    """PEFT's prefix tuning with our prefix's length and reparametrization (prefix_projection, MLP width), so
    that the two methods are compared at equal settings. Settings PEFT cannot follow are refused rather than
    silently dropped."""
    from peft import PrefixTuningConfig

    if prefix.kind != "prefix":
        raise ValueError(f"PEFT's prefix tuning is a prefix, not {prefix.kind!r}: use prefix kind 'prefix'")
    if prefix.dropout:
        raise ValueError(f"PEFT's prefix tuning has no prefix dropout: set prefix.dropout=0 (got {prefix.dropout})")
    if not prefix.shift_positions:
        raise ValueError("PEFT's prefix tuning always shifts the real tokens' positions by L: set shift_positions")
    if prefix.init_text is not None or prefix.init_vocab:
        raise ValueError("PEFT's prefix tuning starts from random values: set prefix.init_text=null, init_vocab=false")
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prefix.length,
        prefix_projection=prefix.reparam == "mlp",
        encoder_hidden_size=prefix.hidden_dim,
    )


@torch.no_grad()
def peft_generate(
    model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generation: Any
) -> torch.Tensor:
    """``generate`` for a causal LM with a PEFT prefix; returns prompt + new tokens, like ``generate``."""
    length = model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # PEFT types base_model as a plain Module.
    copies = rows_per_input(model.base_model.generation_config, generation)  # type: ignore[arg-type]
    cache = model.get_prompt(batch * copies)
    placeholders = input_ids.new_full((batch, length), generation.get("pad_token_id") or 0)
    # PEFT types base_model as a plain Module.
    output = model.base_model.generate(  # type: ignore[operator]
        input_ids=torch.cat([placeholders, input_ids], dim=1),
        attention_mask=torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1),
        cache=cache,
        **generation,
    )
    return output[:, length:]
