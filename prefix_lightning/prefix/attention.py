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
only while all of [w; x] fits in the window (L plus x's tokens); past that, a query still sees all of w, where
[w; x]'s window would have slid past w's first tokens.

Models with a relative position bias passed to attention (T5) get the bias of the prefix columns from the site's
``PrefixBias`` hook (see :mod:`prefix_lightning.prefix.relative_bias`).

A site's prefix is one block shared by every row of the batch (``PrefixModel``), or, for a batch that mixes
prefixes (``PrefixBank``), an object whose ``rows(batch)`` gives each row's keys/values and the prefix columns that
row sees (prefixes of different lengths are padded to the longest, rows without a prefix see none) and whose
``bias(hook, bias, batch)`` gives each row's prefix-column position bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
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
    sliding_window: int | None = None  # the window the layer attends through (Mistral, Gemma's local layers)


class RowsPrefix(Protocol):
    """A site's prefix where the rows of a batch read different ones (``PrefixBank``; see ``prefix.rows.SiteRows``)."""

    def rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's keys and values (batch, kv_heads, L_max, head_dim) and the columns it sees (batch, L_max)."""
        ...

    def bias(self, hook: PrefixBias, bias: torch.Tensor, batch: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Each row's position bias of the prefix columns (batch, heads, queries, L_max), from the site's hook."""
        ...


class PrefixInjector:
    """The per-model switchboard that the attention function reads.

    ``prefixes`` maps a site group to its materialized prefix: one (2, kv_heads, L, head_dim) block per site.
    It is set once per forward/generate by the owner and kept until the next one, so that gradient
    checkpointing recomputes layers with the very same prefix tensors. Setting it hands each bound site its own
    block (``SiteBinding.block``), which a compiled block reads as an input of its graph: a lookup by the site's index
    would be a constant of the graph, one compilation per block (see backbones.compiled).
    """

    # Whether compiled blocks trace the attention of this injector's sites; a bank's per-row prefixes run eager.
    traceable = True

    def __init__(self, infix: bool = False, shift: int = 0) -> None:
        self.enabled = True
        self.infix = infix
        self.shift = shift  # added to real tokens' positions (see prefix.positions)
        self.prompt_width: int | None = None  # set by generate for an infix
        self._prefixes: dict[str, list[torch.Tensor]] | None = None
        self.bindings: list[SiteBinding] = []  # every site bound to this injector (see bind)

    def __getstate__(self) -> dict:
        """Copies (pickling for spawned processes) start without the materialized prefix of the last forward."""
        return {**self.__dict__, "_prefixes": None}

    @property
    def prefixes(self) -> dict[str, list[torch.Tensor]] | None:
        return self._prefixes

    @prefixes.setter
    def prefixes(self, prefixes: dict[str, list[torch.Tensor]] | None) -> None:
        self._prefixes = prefixes
        for binding in self.bindings:
            binding.block = None if prefixes is None else prefixes[binding.group][binding.index]

    def lookup(self, binding: SiteBinding) -> torch.Tensor | RowsPrefix | None:
        """The prefix that a bound site reads now: one block for every row, or each row its own."""
        return binding.block if self.enabled else None

    def position_shift(self, rows: int) -> int | torch.Tensor:
        """What real tokens' positions move by in a call with ``rows`` rows: one number for all rows here."""
        return self.shift

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


# The position bias of a site's prefix columns: (position bias of the real keys (..., queries, keys), prefix length
# L, each query's position in its row (rows, queries) where the call passed QUERY_POSITIONS) -> the bias of the L
# prefix columns (rows or 1, heads, queries, L).
PrefixBias = Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]


@dataclass(eq=False)
class SiteBinding:
    """Where an attention module reads its prefix: the injector, the site's (group, index) and position-bias hook,
    and the site's block of the current forward."""

    injector: PrefixInjector
    group: str
    index: int
    bias: PrefixBias | None = None
    block: torch.Tensor | None = None  # the site's prefix of the current forward, set by the injector

    def __getstate__(self) -> dict:
        return {**self.__dict__, "block": None}


# The binding is an attribute of the attention module, so that it travels with the model when the model is
# copied or pickled (ddp_spawn sends it to each process).
_BINDING = "_prefix_binding"
_recording: list[AttentionCall] | None = None


def bind(module: nn.Module, injector: PrefixInjector, group: str, index: int, bias: PrefixBias | None = None) -> None:
    """Route ``module``'s attention through ``injector``'s prefix at (group, index); ``bias`` gives the prefix
    columns' position bias where the model passes one."""
    if hasattr(module, _BINDING):
        raise ValueError("this attention module already carries a prefix: wrap each base model only once")
    binding = SiteBinding(injector, group, index, bias)
    setattr(module, _BINDING, binding)
    injector.bindings.append(binding)


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
# Forward keyword: (batch or 1, tokens), each token's position as if its row were unpadded (see prefix.relative_bias).
QUERY_POSITIONS = "prefix_query_positions"


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
    seen: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Prepend ``prefix_length`` key columns to the attention mask: visible to every query, or where ``seen``
    (bool, broadcastable to (batch, 1, queries, prefix_length)) says so.

    With no mask the model relied on SDPA's ``is_causal``, which aligns top-left and would be wrong once keys
    outnumber queries: the causal pattern is built explicitly (bottom-right aligned) before widening.
    """
    query_length = query.shape[2]
    if mask is None:
        if (not causal or query_length == 1) and (seen is None or bool(seen.all())):
            return None
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
        if causal:
            mask = mask.tril(diagonal=key_length - query_length)
        mask = mask[None, None]
    if mask.shape[-1] != key_length:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys but the layer has {key_length}")
    if seen is None:
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros
        columns = visible(*mask.shape[:-1], prefix_length, dtype=mask.dtype, device=mask.device)
    else:
        seen = seen.expand(-1, mask.shape[1], query_length, prefix_length)
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
    """SDPA attention with the module's prefix keys/values in front of its own.

    Inside a compiled block this is traced into the block's graph where the site reads one block for every row;
    what would be specialized on the site or cannot be traced runs eager, a break in the graph: recording the
    calls, a bank's per-row prefixes, the prefix columns' position bias (each site its own hook).
    """
    binding = getattr(module, _BINDING, None)
    if _recording is not None or (binding is not None and (binding.bias is not None or not binding.injector.traceable)):
        return _eager_prefix_attention(module, query, key, value, attention_mask, **kwargs)
    return _prefix_attention(module, query, key, value, attention_mask, **kwargs)


def _prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if _recording is not None:
        biased = kwargs.get("position_bias") is not None
        window = kwargs.get("sliding_window")
        _recording.append(AttentionCall(module, query.shape[2], key, value, biased, window))
    queries = kwargs.pop(INFIX_QUERIES, None)
    positions = kwargs.pop(QUERY_POSITIONS, None)
    binding = getattr(module, _BINDING, None)
    prefix = binding.injector.lookup(binding) if binding is not None else None
    if binding is not None and prefix is not None:
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        if attention_mask is None and causal and key.shape[2] > query.shape[2] > 1:
            key, value, kwargs = _without_empty_static_slots(query.shape[2], key, value, kwargs)
        batch = key.shape[0]
        seen = None
        if isinstance(prefix, torch.Tensor):  # one block for every row
            keys, values = (block.expand(batch, -1, -1, -1) for block in prefix.to(dtype=key.dtype))
        else:  # each row its own (a batch that mixes prefixes)
            keys, values, columns = prefix.rows(batch)
            keys, values, seen = keys.to(key.dtype), values.to(key.dtype), columns[:, None, None, :]
        if binding.injector.infix:
            start = key.shape[2] - query.shape[2]  # the cached tokens before this call's
            rows, _ = infix_rows(binding.injector, queries, start, query.shape[2], query.device)
            seen = rows[:, None, :, None]
        bias = kwargs.get("position_bias")
        plain_causal = attention_mask is None and causal and seen is None and bias is None and query.shape[2] > 1
        if plain_causal and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode():
            # Causal over real tokens, every prefix column visible: the bottom-right aligned causal pattern, which
            # SDPA's flash and memory-efficient kernels apply without a mask in memory. (It is a tensor subclass,
            # which cannot be made under a dispatch mode such as FlopCounterMode nor traced into a compiled graph:
            # there the mask is explicit.)
            attention_mask = causal_lower_right(query.shape[2], keys.shape[2] + key.shape[2])
        else:
            attention_mask = _widen_mask(attention_mask, causal, query, key.shape[2], keys.shape[2], seen)
        if bias is not None:
            if binding.bias is None:
                raise RuntimeError(f"{type(module).__name__} passes a position bias that no prefix hook extends")
            if isinstance(prefix, torch.Tensor):
                columns = binding.bias(bias, keys.shape[2], positions).to(bias.dtype)
            else:
                columns = prefix.bias(binding.bias, bias, batch, positions)
            rows = max(columns.shape[0], bias.shape[0])  # 1 where every row has the same
            kwargs["position_bias"] = torch.cat([columns.expand(rows, -1, -1, -1), bias.expand(rows, -1, -1, -1)], -1)
        key = torch.cat([keys, key], dim=2)
        value = torch.cat([values, value], dim=2)
        kwargs["is_causal"] = False
    if isinstance(attention_mask, CausalBias) and flash_takes_grouped_heads(query, key, value):
        return grouped_causal_attention(query, key, value, attention_mask, **kwargs)
    if query.is_cuda:
        with sdpa_kernel(CUDA_KERNELS):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def flash_takes_grouped_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether SDPA's flash kernel would read this grouped-query call's key/value heads as they are (CUDA, half
    precision; never on the CPU)."""
    if key.shape[1] == query.shape[1]:
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, False, True)
    return torch.backends.cuda.can_use_flash_attention(params)


def grouped_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: CausalBias,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for the prefix's causal columns, the key/value heads left grouped.

    transformers repeats a grouped-query layer's keys/values to every query head for any call with a mask (SDPA's
    own grouping it asks for only without one), and the bottom-right causal bias is a mask to it: two copies per
    layer, kept for the backward at the query heads' count. The flash kernel that the bias runs reads the groups as
    they are.
    """
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def _without_empty_static_slots(
    queries: int, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The keys/values (and position bias) of a mask-less causal call cut to the first ``queries`` keys.

    transformers passes no mask to a causal call with more keys than queries (several of them) only for the
    prefill of an empty static cache: the keys past the queries are its unfilled slots, which SDPA's top-left
    ``is_causal`` hides (transformers' SDPA cuts them too). Once the prefix's columns come first, the causal
    pattern aligns bottom-right, which would show those slots to every query.
    """
    bias = kwargs.get("position_bias")
    if bias is not None:
        kwargs = {**kwargs, "position_bias": bias[..., :queries]}
    return key[:, :, :queries], value[:, :, :queries], kwargs


# SDPA's kernels on CUDA, cuDNN's left out: cuDNN builds a plan for every new shape, and here every training batch
# has its own length and every decoding step its own number of keys; the others are compiled ahead (docs/gpu.md).
CUDA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_eager_prefix_attention = torch.compiler.disable(_prefix_attention)
AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
