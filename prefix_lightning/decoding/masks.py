"""Masks and positions as transformers' ``generate`` derives them, shared by every decoding route and the
prefix's position shift, so that all of them count positions alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position as if its row were unpadded (left padding; pads, which no token reads, at 0), as
    ``generate`` counts them; a forward given no ids would count the pads."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@overload
def token_ids(ids: int | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor: ...
@overload
def token_ids(ids: None, device: torch.device) -> None: ...
@overload
def token_ids(ids: int | Sequence[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None: ...
def token_ids(ids: int | Sequence[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """One or several token ids as a flat tensor, None kept."""
    if ids is None:
        return None
    return torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)


def generation_mask(
    input_ids: torch.Tensor, pad_token_id: int | None, eos_token_id: int | Sequence[int] | None
) -> torch.Tensor:
    """The attention mask ``generate`` infers when none is given: the pad token's positions, if it is not an
    end token and occurs in the input; otherwise every position."""
    eos = token_ids(eos_token_id, input_ids.device)
    if pad_token_id is None and eos is not None:
        pad_token_id = int(eos[0])
    if pad_token_id is None or (eos is not None and bool((eos == pad_token_id).any())):
        return torch.ones_like(input_ids)
    padding = input_ids == pad_token_id
    return (~padding).long() if bool(padding.any()) else torch.ones_like(input_ids)
