"""Prefix injection inside attention, through transformers' attention interface.

Every attention module of a model set to ``ATTN_IMPLEMENTATION`` calls :func:`prefix_attention` with its
queries, keys and values. Modules bound to a :class:`PrefixInjector` get that injector's prefix keys/values
concatenated in front of their own, and the mask widened so that every query sees all L prefix positions (for an
infix, only the queries of the target: see :func:`infix_rows`).
The LM's cache is never touched: it holds real tokens only, and the prefix is prepended on every call, which is
what makes encoder self-attention, cross-attention, grouped-query attention, beam search and gradient
checkpointing work through one path.

Sliding-window attention (Mistral with ``sliding_window``, Gemma's local layers): the window applies to real
tokens only. The prefix columns are prepended to whatever mask the layer built, so they stay visible to every
query however far it stands from the start, an always-visible "attention sink" in front of the window (the
model's own window still limits which real tokens a query reads). A prefix from words w therefore equals [w; x]
only while x fits in the window; beyond it, the prefix is what the query still sees of w.

Models with a relative position bias passed to attention (T5) get the bias of the prefix columns from the site's
``PrefixBias`` hook (see :mod:`prefix_lightning.prefix.relative_bias`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "prefix_sdpa"


@dataclass
class AttentionCall:
    """One attention call as seen before any prefix is added (site discovery, real-word init, embedding-only)."""

    module: nn.Module
    query_length: int
    key: torch.Tensor
    value: torch.Tensor
    position_bias: bool = False  # the model passed a position bias for the scores (T5)


class PrefixInjector:
    """The per-model switchboard that the attention function reads.

    ``prefixes`` maps a site group to its materialized prefix: one (2, kv_heads, L, head_dim) block per site.
    It is set once per forward/generate by the owner and kept until the next one, so that gradient
    checkpointing recomputes layers with the very same prefix tensors.
    """

    def __init__(self, infix: bool = False) -> None:
        self.enabled = True
        self.infix = infix
        self.prompt_width: int | None = None  # set by generate for an infix
        self.prefixes: dict[str, list[torch.Tensor]] | None = None

    def __getstate__(self) -> dict:
        """Copies (pickling for spawned processes) start without the materialized prefix of the last forward."""
        return {**self.__dict__, "prefixes": None}

    def lookup(self, group: str, index: int) -> torch.Tensor | None:
        if not self.enabled or self.prefixes is None:
            return None
        return self.prefixes[group][index]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


# The position bias of a site's prefix columns: (position bias of the real keys (..., queries, keys), prefix length
# L) -> the bias of the L prefix columns (..., queries, L).
PrefixBias = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class _Binding:
    injector: PrefixInjector
    group: str
    index: int
    bias: PrefixBias | None = None


# The binding is an attribute of the attention module, so that it travels with the model when the model is
# copied or pickled (ddp_spawn sends it to each process).
_BINDING = "_prefix_binding"
_recording: list[AttentionCall] | None = None


def bind(module: nn.Module, injector: PrefixInjector, group: str, index: int, bias: PrefixBias | None = None) -> None:
    """Route ``module``'s attention through ``injector``'s prefix at (group, index); ``bias`` gives the prefix
    columns' position bias where the model passes one."""
    if hasattr(module, _BINDING):
        raise ValueError("this attention module already carries a prefix: wrap each base model only once")
    setattr(module, _BINDING, _Binding(injector, group, index, bias))


@contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """Collect every attention call made inside the block (keys/values before prefixing, still in the graph)."""
    global _recording
    calls: list[AttentionCall] = []
    previous, _recording = _recording, calls
    try:
        yield calls
    finally:
        _recording = previous


INFIX_QUERIES = "infix_queries"  # forward keyword: (batch, tokens) bool, the tokens that read the infix


def infix_rows(
    injector: PrefixInjector, queries: torch.Tensor | None, start: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the tokens at sequence indices start..start+length-1: which read the infix, and which stand after it.

    [x; INFIX; y]: the target y reads the infix and takes positions shifted by L; so does the last source token,
    which predicts y's first token and stands in for the infix's last position, but unshifted. Training passes
    ``infix_queries`` (from the labels); generate sets the padded prompt width on the injector; any other call
    is all prompt.
    """
    if queries is not None:
        reads = queries.bool()
        return reads, reads & (reads.cumsum(1) > 1)
    width = injector.prompt_width if injector.prompt_width is not None else start + length
    index = torch.arange(start, start + length, device=device)[None]
    return index >= width - 1, index >= width


def _widen_mask(
    mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key_length: int,
    prefix_length: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Prepend ``prefix_length`` key columns to the attention mask: visible to every query, or to ``rows`` only.

    With no mask the model relied on SDPA's ``is_causal``, which aligns top-left and would be wrong once keys
    outnumber queries: the causal pattern is built explicitly (bottom-right aligned) before widening.
    """
    query_length = query.shape[2]
    if mask is None:
        if (not causal or query_length == 1) and (rows is None or bool(rows.all())):
            return None
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
        if causal:
            mask = mask.tril(diagonal=key_length - query_length)
        mask = mask[None, None]
    if mask.shape[-1] != key_length:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys but the layer has {key_length}")
    if rows is None:
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros
        columns = visible(*mask.shape[:-1], prefix_length, dtype=mask.dtype, device=mask.device)
    else:
        seen = rows[:, None, :, None].expand(-1, mask.shape[1], -1, prefix_length)
        if mask.dtype != torch.bool:
            hidden = torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
            seen = torch.where(seen, torch.zeros_like(hidden), hidden)
        batch = max(mask.shape[0], seen.shape[0])
        mask, columns = mask.expand(batch, -1, -1, -1), seen.expand(batch, -1, -1, -1)
    return torch.cat([columns, mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention with the module's prefix keys/values in front of its own."""
    if _recording is not None:
        biased = kwargs.get("position_bias") is not None
        _recording.append(AttentionCall(module, query.shape[2], key, value, biased))
    queries = kwargs.pop(INFIX_QUERIES, None)
    binding = getattr(module, _BINDING, None)
    prefix = binding.injector.lookup(binding.group, binding.index) if binding is not None else None
    if binding is not None and prefix is not None:
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        batch, length = key.shape[0], prefix.shape[2]
        prefix = prefix.to(dtype=key.dtype)
        rows = None
        if binding.injector.infix:
            start = key.shape[2] - query.shape[2]  # the cached tokens before this call's
            rows, _ = infix_rows(binding.injector, queries, start, query.shape[2], query.device)
        attention_mask = _widen_mask(attention_mask, causal, query, key.shape[2], length, rows)
        bias = kwargs.get("position_bias")
        if bias is not None:
            if binding.bias is None:
                raise RuntimeError(f"{type(module).__name__} passes a position bias that no prefix hook extends")
            kwargs["position_bias"] = torch.cat([binding.bias(bias, length).to(bias.dtype), bias], dim=-1)
        key = torch.cat([prefix[0].expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix[1].expand(batch, -1, -1, -1), value], dim=2)
        kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
