"""Finding the attention layers that receive a prefix, by watching one tiny forward pass.

Probing, rather than reading config fields, gives the true key/value head count and head size of every
layer (grouped-query attention included) and tells encoder, decoder and cross-attention apart by their
query/key lengths, without a table of model families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from prefix_lightning.prefix.attention import ATTN_IMPLEMENTATION, record_attention_calls

SUPPORTED = "decoder-only LMs such as GPT-2 and the Llama family (SmolLM2), and encoder-decoders such as BART"

# Distinct probe lengths tell the three kinds of attention of an encoder-decoder apart.
_ENCODER_PROBE, _DECODER_PROBE = 3, 2


class UnsupportedModelError(ValueError):
    """The base model cannot carry a prefix."""


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer that gets L prefix key/value vectors per key/value head."""

    name: str
    group: str  # "self" (decoder-only), or "encoder", "decoder", "cross" (encoder-decoder)
    kv_heads: int
    head_dim: int


def _group(is_encoder_decoder: bool, query_length: int, key_length: int) -> str:
    if not is_encoder_decoder:
        return "self"
    if query_length == _ENCODER_PROBE:
        return "encoder"
    return "decoder" if key_length == _DECODER_PROBE else "cross"


def discover_sites(lm: PreTrainedModel) -> list[tuple[torch.nn.Module, AttentionSite]]:
    """Every attention module of ``lm`` in call order, with its site description."""
    if lm.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError("set the model's attention implementation before discovering sites")
    names = {module: name for name, module in lm.named_modules()}
    device = next(lm.parameters()).device
    is_encoder_decoder = bool(getattr(lm.config, "is_encoder_decoder", False))
    probe = {"input_ids": torch.zeros(1, _ENCODER_PROBE if is_encoder_decoder else 4, dtype=torch.long, device=device)}
    if is_encoder_decoder:
        probe["decoder_input_ids"] = torch.zeros(1, _DECODER_PROBE, dtype=torch.long, device=device)
    with record_attention_calls() as calls, torch.no_grad():
        lm(**probe, use_cache=False)
    sites: dict[torch.nn.Module, AttentionSite] = {}
    for call in calls:
        if call.module not in sites:
            group = _group(is_encoder_decoder, call.query_length, call.key.shape[2])
            sites[call.module] = AttentionSite(names[call.module], group, call.key.shape[1], call.key.shape[3])
    if not sites:
        raise UnsupportedModelError(
            f"{type(lm).__name__} does not route attention through transformers' AttentionInterface, so no "
            f"prefix can be attached. Supported: {SUPPORTED}."
        )
    return list(sites.items())
