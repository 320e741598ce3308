"""The relative position bias of the prefix columns, for models that pass one to attention (the T5 family).

T5 has no position embeddings: each attention layer adds to its scores a learned bias indexed by the bucketed
distance between key and query (``memory_position - query_position``), computed by the first layer of each stack
and shared by the others (UMT5 gives every self-attention layer a table of its own, which computes that layer's
bias). The prefix's L columns get the bias they would have, in the layer's table, as L real tokens right before the
input, the positions that real-word initialization computes them at:

- self-attention (encoder, bidirectional; decoder, causal): for a query at position i of its row as if unpadded
  (i counts the row's real tokens before it, those in the decoder's cache included) and prefix slot j in 0..L-1,
  the distance is ``(j - L) - i``: always negative, the prefix stands to the left. The real tokens' distances
  among themselves are unchanged, so the real tokens need no position shift.
- cross-attention has no position bias in T5 (its bias is zero): the prefix columns get zero as well, which is
  what L real encoder tokens would get.
- with ``prefix.shift_positions=false`` the prefix has no position: its columns get zero bias everywhere.

T5 indexes queries by their column in the padded row, which is their position only in a right-padded row: a
pre-hook on each stack (:func:`attach_query_positions`) counts them over the 2-D attention mask instead, as the
position shift of other families does (:func:`prefix_lightning.prefix.positions.positions_from_inputs`), and
passes them down to attention. A left-padded row thus gets the prefix bias it gets alone; T5's own biases, between
real tokens, do not depend on where the padding stands.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from prefix_lightning.prefix.attention import QUERY_POSITIONS, PrefixBias
from prefix_lightning.prefix.positions import input_tokens, positions_from_inputs
from prefix_lightning.prefix.sites import AttentionSite, UnsupportedModelError

# A module's bucketing of relative positions (memory minus query position) into its table's rows.
Bucketing = Callable[[torch.Tensor], torch.Tensor]


def _zero_columns(bias: torch.Tensor, length: int, positions: torch.Tensor | None) -> torch.Tensor:
    return bias.new_zeros(*bias.shape[:-1], length)


def _relative_columns(
    source: nn.Module, bucketing: Bucketing, bias: torch.Tensor, length: int, positions: torch.Tensor | None
) -> torch.Tensor:
    """The bias of ``source``'s relative-attention table for prefix slots at distances ``(j - L) - i`` from each
    query's position i."""
    if positions is None:
        raise RuntimeError(
            f"{type(source).__name__} was called without its queries' positions, which the prefix's relative bias "
            "counts from: its stack is not the model's encoder or decoder (see attach_query_positions)"
        )
    table = cast(nn.Embedding, source.relative_attention_bias)
    device = table.weight.device
    slot_positions = torch.arange(-length, 0, device=device)
    buckets = bucketing(slot_positions - positions.to(device)[..., None])  # (rows, queries, L)
    return table(buckets).permute(0, 3, 1, 2)  # (rows, heads, queries, L)


def _bucketing(module: nn.Module) -> Bucketing | None:
    """How ``module`` buckets relative positions for its own table (None if it has no table): T5's bucketing is a
    staticmethod given the module's settings, UMT5's a method that reads them from its module. Another signature
    is refused, rather than called with settings it may not take."""
    if not isinstance(getattr(module, "relative_attention_bias", None), nn.Embedding):
        return None
    bucket = getattr(module, "_relative_position_bucket", None)
    parameters = inspect.signature(bucket).parameters if callable(bucket) else {}
    if list(parameters) == ["relative_position"]:
        return cast(Bucketing, bucket)
    if list(parameters) == ["relative_position", "bidirectional", "num_buckets", "max_distance"]:
        return partial(
            cast(Callable[..., torch.Tensor], bucket),
            bidirectional=not module.is_decoder,
            num_buckets=module.relative_attention_num_buckets,
            max_distance=module.relative_attention_max_distance,
        )
    raise UnsupportedModelError(
        f"{type(module).__name__} buckets the relative positions of its relative_attention_bias in a way "
        "prefix-lightning does not know (T5's and UMT5's are supported), so the prefix columns cannot get their bias"
    )


def prefix_bias_hooks(
    bound: Sequence[tuple[nn.Module, AttentionSite]], shift_positions: bool
) -> dict[nn.Module, PrefixBias]:
    """The hook of every site whose attention receives a position bias (none for most models).

    A site's bias table is its own if it has one (UMT5's self-attention layers), else that of the nearest earlier
    site of its group that has one (T5 computes the bias in each stack's first layer and passes it on); a group
    without any table (the cross-attention of both) gets zero columns.
    """
    hooks: dict[nn.Module, PrefixBias] = {}
    tables: dict[str, tuple[nn.Module, Bucketing]] = {}
    for module, site in bound:
        bucketing = _bucketing(module)
        if bucketing is not None:
            tables[site.group] = module, bucketing
        if not site.position_bias:
            continue
        if bucketing is None and not hasattr(module, "has_relative_attention_bias"):
            raise UnsupportedModelError(
                f"{type(module).__name__} ({site.name}) adds a position bias to its attention scores that "
                "prefix-lightning does not know how to extend to the prefix (T5's and UMT5's relative bias are "
                "supported)"
            )
        table = tables.get(site.group)
        if table is None or not shift_positions:
            hooks[module] = _zero_columns
        else:
            hooks[module] = partial(_relative_columns, *table)
    return hooks


def _pass_query_positions(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    tokens = input_tokens(args, kwargs)
    if tokens is not None:  # without inputs the LM says what is missing
        kwargs[QUERY_POSITIONS] = positions_from_inputs(tokens, kwargs)
    return args, kwargs


def attach_query_positions(lm: PreTrainedModel) -> list[RemovableHandle]:
    """Have the encoder and decoder stacks of ``lm`` pass each query's position, counted over the 2-D attention
    mask (or after the cached tokens), down to attention, where the prefix's relative bias reads it."""
    stacks = (lm.get_encoder(), lm.get_decoder())
    return [stack.register_forward_pre_hook(_pass_query_positions, with_kwargs=True) for stack in stacks]
