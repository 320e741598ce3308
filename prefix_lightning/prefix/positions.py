"""Shifting real tokens' positions by the prefix length L.

The prefix stands for L virtual tokens at positions 0..L-1 (that is where real-word initialization computes
them), so real tokens start at position L, as in the paper's GPT-2 code and in PEFT (the paper's BART code leaves
BART's positions as they are: ``prefix.shift_positions=false``, which paper_xsum sets). Two mechanisms cover the
supported families:
- models whose forward takes ``position_ids`` (GPT-2, Llama, ...): a pre-hook on the model shifts the given
  ids, or computes them from the 2-D attention mask (left padding) when the caller passed none;
- BART-style learned position embeddings, which take no ids from outside: a hook on each ``embed_positions``
  module gives the embeddings of the moved positions.
The shift is the injector's (``position_shift``): one number for the whole batch, or one per row where a batch
mixes prefixes of different lengths (rows without a prefix keep their usual positions).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from prefix_lightning.decoding.masks import positions_from_mask
from prefix_lightning.prefix.attention import INFIX_QUERIES, PrefixInjector, infix_rows
from prefix_lightning.prefix.inputs import decoder_inputs
from prefix_lightning.prefix.sites import UnsupportedModelError


def position_count(config: Any) -> int | None:
    """How many positions a model config's position table holds (GPT-2 names it ``n_positions``); None where its
    positions are unbounded by a table."""
    count = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return count if isinstance(count, int) else None


def positions_left(config: Any, virtual_positions: int) -> int | None:
    """How many real tokens fit a model of ``config``'s positions behind ``virtual_positions`` virtual ones; None
    where its positions are unbounded by a table."""
    count = position_count(config)
    return None if count is None else count - virtual_positions


def check_positions(
    lm: PreTrainedModel, injector: PrefixInjector, inputs: dict[str, Any], most_shift: int, generated: int = 0
) -> None:
    """Refuse a call whose real tokens, moved behind the prefix, would pass the end of the model's positions (the
    model's own error is an IndexError in its position embedding, or a device-side assert on CUDA).

    ``most_shift``: the largest shift of any row; rows are counted one by one only where the widest would not fit.
    ``generated``: the most tokens ``generate`` adds (to the decoder of an encoder-decoder); all but the last are
    read back.
    """
    left = positions_left(lm.config, most_shift)
    if left is None:
        return
    count = left + most_shift
    read_back = max(generated - 1, 0)
    for side, tokens, mask, continued in _position_sides(lm, inputs, generated > 0):
        added = read_back if continued else 0
        width = mask.shape[1] if mask is not None else tokens.shape[1]
        if width + added <= left:
            continue
        rows = tokens.shape[0]
        lengths = mask.sum(-1) if mask is not None else torch.full((rows,), width, device=tokens.device)
        moved = injector.position_shift(rows) if injector.enabled and most_shift else 0
        shifts = torch.as_tensor(moved, device=tokens.device).reshape(-1).expand(rows)
        over = lengths + added + shifts > count
        if bool(over.any()):
            row = int(over.int().argmax())
            length, shift = int(lengths[row]), int(shifts[row])
            given = f" ({length} given, up to {generated} generated)" if continued else ""
            because = f" behind the prefix's {shift} virtual positions" if shift else ""
            raise ValueError(
                f"{side} row {row} needs {length + added} positions{given}, but {type(lm).__name__}'s {count} "
                f"positions hold only {count - shift}{because}: shorten the input"
                + (" or generate fewer tokens" if continued else "")
            )


_Side = tuple[str, torch.Tensor, torch.Tensor | None, bool]


def _position_sides(lm: PreTrainedModel, inputs: dict[str, Any], generating: bool) -> list[_Side]:
    """The token sequences of a call that take positions: (name, tokens or embeddings, the 2-D mask that counts
    their positions, whether generate continues them). Decoder-only positions are counted over the mask (left
    padding; cached tokens as well), learned encoder-decoder ones by column."""
    keys = ("input_ids", "inputs_embeds", "inputs")  # generate's prompt may come as `inputs`
    tokens = next((inputs[key] for key in keys if inputs.get(key) is not None), None)
    if not lm.config.is_encoder_decoder:
        mask = inputs.get("attention_mask")
        mask = mask if mask is not None and mask.ndim == 2 else None
        return [] if tokens is None else [("input", tokens, mask, generating)]
    sides: list[_Side] = [] if tokens is None else [("encoder input", tokens, None, False)]
    found = decoder_inputs(inputs)
    decoder = found[1] if found is not None else None
    if decoder is None and generating and tokens is not None:  # generate starts the decoder with one token
        decoder = tokens.new_empty(tokens.shape[0], 1)
    if decoder is not None:
        sides.append(("decoder input", decoder, None, generating))
    return sides


def input_tokens(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The token ids a model's forward was called with, or its input embeddings where it was given no ids."""
    tokens = args[0] if args else kwargs.get("input_ids")
    return tokens if tokens is not None else kwargs.get("inputs_embeds")


def positions_from_inputs(tokens: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Positions as if unpadded: counted over the 2-D mask (left padding), else continuing the cache."""
    query_length = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return positions_from_mask(mask)[:, -query_length:]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + query_length, device=tokens.device).unsqueeze(0)


def _cached_length(tokens: torch.Tensor, kwargs: dict[str, Any]) -> int:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return mask.shape[1] - tokens.shape[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if cache is not None else 0


def _shift_position_ids(
    injector: PrefixInjector, module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict]:
    tokens = input_tokens(args, kwargs)
    if injector.enabled and tokens is not None:  # without inputs the LM says what is missing
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = positions_from_inputs(tokens, kwargs)
        shift = injector.position_shift(tokens.shape[0])
        if injector.infix:  # only the tokens after the infix move
            start, count = _cached_length(tokens, kwargs), tokens.shape[1]
            reads, after = infix_rows(injector, kwargs.get(INFIX_QUERIES), start, count, tokens.device)
            kwargs["position_ids"] = positions + shift * after
            # Attention reads the same rows: it cannot count the cached tokens itself where the cache's keys
            # include unfilled slots (a static cache).
            kwargs[INFIX_QUERIES] = reads
            if kwargs.get("attention_mask") is None:
                # Without a mask transformers takes a jump in the position ids for the start of another sequence
                # packed into the row, and hides the source from the target.
                rows = tokens.shape[0]
                kwargs["attention_mask"] = torch.ones(rows, start + count, dtype=torch.long, device=tokens.device)
        else:
            kwargs["position_ids"] = positions + shift
    return args, kwargs


def _shift_learned_embedding(
    injector: PrefixInjector, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    """The embeddings of the positions moved by the shift: the module's own forward from a later start (or at
    later ids), once per distinct shift, each row taking its own."""
    if not injector.enabled:
        return output
    tokens = args[0] if args else next(kwargs[key] for key in ("input_ids", "input_ids_shape") if key in kwargs)
    if tokens is None:  # a decoder given embeddings (decoder_inputs_embeds) passes no ids: the output's rows stand in
        tokens = output[..., 0]
    # Sinusoidal tables (Pegasus, Marian) take the ids' shape and give one row of embeddings for the whole batch.
    shift = injector.position_shift(tokens[0] if isinstance(tokens, tuple) else tokens.shape[0])
    per_row = torch.as_tensor(shift, device=output.device).reshape(-1, 1, 1)
    result = output
    for value in per_row.unique().tolist():
        if value == 0:
            continue
        if kwargs.get("position_ids") is not None:
            moved = type(module).forward(module, tokens, position_ids=kwargs["position_ids"] + value)
        else:
            start = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
            moved = type(module).forward(module, tokens, start + value)
        result = torch.where(per_row == value, moved, result)
    return result


def position_embedding_modules(lm: PreTrainedModel) -> list[nn.Module]:
    """The BART-style position embeddings, which move every token of the sequence they embed."""
    return [
        module
        for name, module in lm.named_modules()
        if name.endswith("embed_positions") and "cache_length" in inspect.signature(module.forward).parameters
    ]


def attach_position_shift(lm: PreTrainedModel, injector: PrefixInjector) -> list[RemovableHandle]:
    """Install the hooks that offset positions by the injector's shift while it is enabled.

    The hooks are partials of module-level functions, not closures, so that the model can be pickled.
    """
    embedding_modules = position_embedding_modules(lm)
    if embedding_modules:
        hook = partial(_shift_learned_embedding, injector)
        return [m.register_forward_hook(hook, with_kwargs=True) for m in embedding_modules]
    if not lm.config.is_encoder_decoder and "position_ids" in inspect.signature(lm.forward).parameters:
        return [lm.register_forward_pre_hook(partial(_shift_position_ids, injector), with_kwargs=True)]
    raise UnsupportedModelError(
        f"don't know how to shift the positions of {type(lm).__name__}; set prefix.shift_positions=false "
        "to keep real tokens at their usual positions"
    )
