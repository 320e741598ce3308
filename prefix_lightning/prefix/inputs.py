"""The checks of a call's tensors before the LM runs: a wrong shape, type, token id or device is named here, where
the LM would fail deep inside (an IndexError, a size mismatch, a device-side assert on CUDA) or, for a mask of the
wrong size, broadcast it or count positions from it without a word."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

CACHE_KEYS = ("cache", "past_key_values")


def check_inputs(lm: PreTrainedModel, inputs: dict[str, Any]) -> None:
    """Refuse ``input_ids`` that are not integer ids of (batch, tokens) in the LM's vocabulary, a 2-D
    ``attention_mask`` that does not give one entry per token (cached ones included) on their device, and
    decoder-only ``labels`` of another shape than the ids."""
    ids = inputs.get("input_ids")
    if ids is not None:
        _check_token_ids(lm, ids)
    tokens = ids if ids is not None else inputs.get("inputs_embeds")
    if tokens is None:  # generate starts from the start token, an encoder-decoder may be given encoder_outputs
        return
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        cached = any(inputs.get(key) is not None for key in CACHE_KEYS)
        rows, width = tokens.shape[:2]
        fits = mask.shape[0] == rows and (mask.shape[1] >= width if cached else mask.shape[1] == width)
        if not fits:
            entries = "one entry per token (cached ones included)" if cached else "one entry per token"
            raise ValueError(
                f"attention_mask is {tuple(mask.shape)}, the inputs {(rows, width)}: a 2-D mask has {entries}"
            )
        if mask.device != tokens.device:
            raise ValueError(f"attention_mask is on {mask.device}, the inputs on {tokens.device}: put them together")
    labels = inputs.get("labels")
    if labels is not None and not lm.config.is_encoder_decoder and labels.shape != tokens.shape[:2]:
        raise ValueError(
            f"labels are {tuple(labels.shape)}, the inputs {tuple(tokens.shape[:2])}: a decoder-only LM takes one "
            "label per input token (-100 where no loss is taken)"
        )


def _check_token_ids(lm: PreTrainedModel, ids: Any) -> None:
    if not (isinstance(ids, torch.Tensor) and ids.ndim == 2):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be a tensor of (batch, tokens), as a tokenizer returns it; got {shape}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        return
    # transformers types the embeddings as a plain Module.
    vocabulary: int = lm.get_input_embeddings().num_embeddings  # type: ignore[assignment]
    low, high = (int(value) for value in torch.aminmax(ids))
    if low < 0 or high >= vocabulary:
        wrong = low if low < 0 else high
        raise ValueError(
            f"input_ids hold the token id {wrong}, outside the vocabulary of {type(lm).__name__} (0..{vocabulary - 1}):"
            " was the input tokenized with another model's tokenizer?"
        )
