"""Wiring a frozen LM to a prefix injector, shared by the one-prefix ``PrefixModel`` and the many-prefix
``PrefixBank``: hold the LM frozen, bind every attention site, read the plain LM's own keys/values per site, name
each site's cache layer, recompute the layers in backward."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_lightning.decoding import PackedWeights
from prefix_lightning.prefix.attention import PrefixInjector, bind, record_attention_calls
from prefix_lightning.prefix.relative_bias import attach_query_positions, prefix_bias_hooks
from prefix_lightning.prefix.sites import AttentionSite, discover_sites, site_modules, use_prefix_attention

SiteKey = tuple[str, int]  # (group, index of the site within its group, in call order)
Wrapper = TypeVar("Wrapper", bound="FrozenLMWrapper")


class FrozenLMWrapper(nn.Module):
    """A module around a frozen LM that calls attention through the prefix: the LM trains nothing and stays in eval
    mode (no LM dropout) whatever mode the wrapper is in, and keeps its weights packed for decoding on CPU."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        use_prefix_attention(lm)
        self.lm = lm
        lm.requires_grad_(False)
        lm.eval()
        self.packed_weights = PackedWeights()

    def train(self: Wrapper, mode: bool = True) -> Wrapper:
        super().train(mode)
        self.lm.eval()
        if mode:  # back to training: the packed copy of the weights is not needed until the next decoding
            self.packed_weights.clear()
        return self


def site_keys(sites: Sequence[AttentionSite]) -> list[SiteKey]:
    """Each site's (group, index): where its block sits in a group's list of blocks."""
    counters: dict[str, int] = {}
    keys = []
    for site in sites:
        keys.append((site.group, counters.get(site.group, 0)))
        counters[site.group] = keys[-1][1] + 1
    return keys


def bind_sites(lm: PreTrainedModel, injector: PrefixInjector, shift_positions: bool) -> list[AttentionSite]:
    """Route every attention site of ``lm`` (already set to the prefix attention) through ``injector``; sites
    with a relative position bias (T5) get the hook that extends it to the prefix columns, and, where the prefix
    has positions, the queries' positions to compute it from."""
    bound = discover_sites(lm)
    bias_hooks = prefix_bias_hooks(bound, shift_positions)
    sites = [site for _, site in bound]
    for (module, _), (group, index) in zip(bound, site_keys(sites), strict=True):
        bind(module, injector, group, index, bias_hooks.get(module))
    if shift_positions and bias_hooks:
        attach_query_positions(lm)
    return sites


def site_activations(
    lm: PreTrainedModel, injector: PrefixInjector, sites: Sequence[AttentionSite], **inputs: Any
) -> list[torch.Tensor]:
    """The plain LM's keys/values of one sequence at every site, (2, kv_heads, tokens, head_dim), with the prefix
    switched off (positions 0, 1, ...): what a prefix of those tokens holds."""
    # Not recomputed in backward: the layers would run again with the prefix switched back on (an embedding-only
    # prefix's own pass, which trains through them, computed other tensors the second time).
    token = _recomputing.set(False)
    try:
        with injector.disabled(), record_attention_calls() as calls:
            lm(**inputs, use_cache=False)
    finally:
        _recomputing.reset(token)
    by_module = {id(call.module): call for call in calls}
    return [torch.stack([call.key[0], call.value[0]]) for call in (by_module[id(m)] for m in site_modules(lm, sites))]


def cache_layers(lm: PreTrainedModel, sites: Sequence[AttentionSite]) -> list[int] | None:
    """The cache layer of each site, for a decoder-only LM whose attention modules name theirs (one site each);
    None where a prefix cannot be put in the cache."""
    if lm.config.is_encoder_decoder:
        return None
    layers = [getattr(module, "layer_idx", None) for module in site_modules(lm, sites)]
    numbered = [layer for layer in layers if isinstance(layer, int)]
    if not numbered or len(numbered) != len(layers) or len(set(numbered)) != len(numbered):
        return None
    return numbered


def checkpoint_layers(lm: PreTrainedModel) -> None:
    """Recompute ``lm``'s layers in backward instead of storing their activations.

    transformers only checkpoints layers in training mode, and the LM stays in eval mode here (no dropout),
    so the layers are wrapped directly with non-reentrant checkpointing, which lets gradients reach the
    prefix that the layers read from outside their inputs.
    """
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer) and "forward" not in vars(module):
            module.forward = partial(_checkpointed, module)


# Whether checkpointed layers recompute in backward; off for passes that run with the prefix switched off.
_recomputing: ContextVar[bool] = ContextVar("recomputing", default=True)


def _checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward, recomputed in backward (a partial of this function pickles with the model)."""
    forward = partial(type(module).forward, module)
    if not torch.is_grad_enabled() or not _recomputing.get():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
