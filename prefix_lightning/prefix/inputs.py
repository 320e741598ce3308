"""The checks of a call's tensors before the LM runs: a wrong shape, type, token id or device is named here, where
the LM would fail deep inside (an IndexError, a size mismatch, a device-side assert on CUDA) or, for a mask of the
wrong size, broadcast it or count positions from it without a word."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

CACHE_KEYS = ("cache", "past_key_values")
DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")  # labels: shifted into the decoder's ids


def decoder_inputs(inputs: dict[str, Any]) -> tuple[str, torch.Tensor] | None:
    """An encoder-decoder call's decoder side, by name: its ids, its embeddings, or the labels it is made from."""
    return next(((key, inputs[key]) for key in DECODER_KEYS if inputs.get(key) is not None), None)


def check_inputs(lm: PreTrainedModel, inputs: dict[str, Any]) -> None:
    """Refuse ``input_ids`` that are not integer ids of (batch, tokens) in the LM's vocabulary (read on the CPU
    only), a 2-D attention mask that does not give one entry per token (cached ones included) on their device,
    decoder-only ``labels`` of another shape than the ids, and an encoder-decoder's decoder inputs (or labels) for
    another number of rows."""
    ids = inputs.get("input_ids")
    if ids is not None:
        _check_token_ids(lm, ids)
    tokens = ids if ids is not None else inputs.get("inputs_embeds")
    if tokens is None:  # generate starts from the start token, an encoder-decoder may be given encoder_outputs
        return
    cached = any(inputs.get(key) is not None for key in CACHE_KEYS)
    _check_mask("attention_mask", inputs.get("attention_mask"), tokens, "the inputs", cached)
    labels = inputs.get("labels")
    if not lm.config.is_encoder_decoder:
        if labels is not None and labels.shape != tokens.shape[:2]:
            raise ValueError(
                f"labels are {tuple(labels.shape)}, the inputs {tuple(tokens.shape[:2])}: a decoder-only LM takes one "
                "label per input token (-100 where no loss is taken)"
            )
        return
    found = decoder_inputs(inputs)
    if found is None:
        return
    name, decoder = found
    if decoder.shape[0] != tokens.shape[0]:
        raise ValueError(f"{name}: {decoder.shape[0]} rows for {tokens.shape[0]} input rows; give one per input row")
    _check_mask("decoder_attention_mask", inputs.get("decoder_attention_mask"), decoder, f"the {name}", cached)


def _check_mask(name: str, mask: Any, tokens: torch.Tensor, what: str, cached: bool) -> None:
    """A 2-D mask of ``tokens`` (``what``, in a message): one entry per token (at least, after a cache), on their
    device."""
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        return
    rows, width = tokens.shape[:2]
    if not (mask.shape[0] == rows and (mask.shape[1] >= width if cached else mask.shape[1] == width)):
        entries = "one entry per token (cached ones included)" if cached else "one entry per token"
        raise ValueError(f"{name} is {tuple(mask.shape)}, {what} {(rows, width)}: a 2-D mask has {entries}")
    if mask.device != tokens.device:
        raise ValueError(f"{name} is on {mask.device}, {what} on {tokens.device}: put them together")


def _check_token_ids(lm: PreTrainedModel, ids: Any) -> None:
    if not (isinstance(ids, torch.Tensor) and ids.ndim == 2):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be a tensor of (batch, tokens), as a tokenizer returns it; got {shape}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.numel() == 0 or ids.device.type != "cpu":
        return  # read back from an accelerator, the ids would cost a host synchronisation per training step
    # transformers types the embeddings as a plain Module.
    vocabulary: int = lm.get_input_embeddings().num_embeddings  # type: ignore[assignment]
    low, high = (int(value) for value in torch.aminmax(ids))
    if low < 0 or high >= vocabulary:
        wrong = low if low < 0 else high
        raise ValueError(
            f"input_ids hold the token id {wrong}, outside the vocabulary of {type(lm).__name__} (0..{vocabulary - 1}):"
            " was the input tokenized with another model's tokenizer?"
        )
