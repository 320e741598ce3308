"""Finding the attention layers that receive a prefix, by watching one tiny forward pass.

Probing, rather than reading config fields, gives the true key/value head count and head size of every
layer (grouped-query attention included) and tells encoder, decoder and cross-attention apart by their
query/key lengths, without a table of model families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from prefix_lightning.prefix.attention import ATTN_IMPLEMENTATION, record_attention_calls

SUPPORTED = (
    "decoder-only LMs (GPT-2, the Llama family such as SmolLM2, Qwen2, Qwen3, Mistral, Phi-3, Gemma, Gemma-3, "
    "Gemma-4, GPT-NeoX, OPT) and encoder-decoders (BART, T5, Flan-T5, UMT5)"
)

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
    position_bias: bool = False  # the model adds a position bias to this layer's scores (T5)
    sliding_window: int | None = None  # the layer's attention window, if it has one


def _group(is_encoder_decoder: bool, query_length: int, key_length: int) -> str:
    if not is_encoder_decoder:
        return "self"
    if query_length == _ENCODER_PROBE:
        return "encoder"
    return "decoder" if key_length == _DECODER_PROBE else "cross"


def use_prefix_attention(lm: PreTrainedModel) -> None:
    """Route ``lm``'s attention through the prefix's attention function, or say why its family cannot carry a
    prefix and what would work."""
    name = type(lm).__name__
    if not isinstance(lm, PreTrainedModel):
        raise TypeError(
            f"a prefix wraps a transformers model (a PreTrainedModel, e.g. from load_backbone), not a {name}"
        )
    try:
        lm.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, TypeError) as error:
        raise UnsupportedModelError(_without_sdpa(lm)) from error
    if lm.config._attn_implementation != ATTN_IMPLEMENTATION:  # transformers only warns
        raise UnsupportedModelError(
            f"{name} computes attention inside its own modules, not through transformers' AttentionInterface, so "
            f"no prefix can reach it. Supported: {SUPPORTED}."
        )


def _without_sdpa(lm: PreTrainedModel) -> str:
    """Why a model that refuses SDPA-style attention cannot carry a prefix, naming what it does support."""
    name = type(lm).__name__
    if not any("attention" in type(module).__name__.lower() for module in lm.modules()):
        return (
            f"{name} has no attention layers that a prefix can reach (a state-space or recurrent model has no keys "
            f"and values to prepend to); methods that change weights (method=full, method=lora) still apply. "
            f"Supported: {SUPPORTED}."
        )
    implementations = ["eager"]
    if getattr(lm, "_supports_flex_attn", False):
        implementations.append("flex_attention")
    if getattr(lm, "_supports_flash_attn", False):
        implementations.append("flash_attention_2")
    softcap = getattr(lm.config, "attn_logit_softcapping", None)
    why = f" (it soft-caps its attention scores, attn_logit_softcapping={softcap})" if softcap else ""
    return (
        f"{name} computes attention only with attn_implementation {', '.join(implementations)}{why}; a prefix "
        f"needs SDPA-style attention, which it does not support. Supported: {SUPPORTED}."
    )


def attention_sites(lm: PreTrainedModel) -> list[AttentionSite]:
    """``lm``'s attention sites, none bound to a prefix: what an export is checked against before ``lm`` is
    wrapped, so that a refused export leaves it as it was."""
    use_prefix_attention(lm)
    return [site for _, site in discover_sites(lm)]


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
            kv_heads, head_dim = call.key.shape[1], call.key.shape[3]
            sites[call.module] = AttentionSite(
                names[call.module], group, kv_heads, head_dim, call.position_bias, call.sliding_window
            )
    if not sites and _layer_count(lm.config) == 0:
        raise UnsupportedModelError(f"{type(lm).__name__} has no layers (its config says 0): a prefix needs attention")
    if not sites:
        raise UnsupportedModelError(
            f"{type(lm).__name__} does not route attention through transformers' AttentionInterface, so no "
            f"prefix can be attached. Supported: {SUPPORTED}."
        )
    return list(sites.items())


def _layer_count(config: Any) -> int | None:
    """The number of layers a transformers config gives, under any of its names; None where it gives none."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# What wrappers insert into the names of the modules they wrap: FSDP, activation checkpointing, torch.compile.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A module's or parameter's name as it was before wrappers (FSDP, ...) inserted their segments into it."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def site_modules(lm: torch.nn.Module, sites: Sequence[AttentionSite]) -> list[torch.nn.Module]:
    """Each site's attention module, found by the name it had when the prefix was attached, also after a
    wrapper (FSDP, ...) has changed the names of the LM's modules."""
    named = {unwrapped_name(name): module for name, module in lm.named_modules()}
    return [named[site.name] for site in sites]
