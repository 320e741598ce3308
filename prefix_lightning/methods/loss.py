"""The training loss shared by every method: token-mean cross-entropy over the target tokens only."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from prefix_lightning.methods.sliced_cross_entropy import sliced_cross_entropy

IGNORE_INDEX = -100  # label of positions outside the target (transformers' convention)


def slices_logits(lm: PreTrainedModel) -> bool:
    """Whether this is a causal LM that computes logits at chosen positions only (``logits_to_keep``)."""
    return not lm.config.is_encoder_decoder and "logits_to_keep" in inspect.signature(lm.forward).parameters


def target_loss(
    lm: Any,
    labels: torch.Tensor,
    length_groups: int | None = None,
    on_group: Callable[[torch.Tensor], None] | None = None,
    drop_right_padding_mask: bool = False,
    **inputs: Any,
) -> torch.Tensor:
    """Cross-entropy over ``labels != IGNORE_INDEX``, equal to the LM's own ``loss``, computed with less work.

    Two savings for causal LMs, neither of which changes the loss. The LM head runs only at positions that
    predict a target token (``logits_to_keep``): over a vocabulary of 50k, logits at source and padding
    positions are a large share of a step's work and memory. And the rows are sorted by length and run in
    ``length_groups`` groups, each cut to its own longest row, so that less padding is computed. Grouping pays
    where compute grows with padded tokens and smaller batches stay efficient: ``None`` takes 2 groups on CPU
    and 1 on accelerators, where a small batch is bound by latency rather than by arithmetic (docs/performance.md).
    Encoder-decoder targets fill the decoder: the LM runs whole, on the labels shifted right as its own loss would
    shift them, and the cross-entropy is taken once, in float32 (an LM stored in bf16 would take its own in bf16,
    where causal LMs' loss is float32). The cross-entropy upcasts the logits a slice of rows at a time
    (``sliced_cross_entropy``): no float32 copy of them waits for the backward. ``on_group`` is told each group's rows
    (indices into the batch) before its forward, for state that follows the rows (a bank's per-row prefixes).

    ``drop_right_padding_mask``: a right-padded batch runs without its attention mask. Under causal attention no
    real token sees a padding token after it, so the loss is the same, and attention runs as plain causal
    attention, which the fused GPU kernels take without a mask in memory; transformers also skips building the
    mask (docs/gpu.md). Callers whose LM attends to more than the batch's tokens through the mask (PEFT's prefix
    in the cache) leave it off.
    """
    if lm.config.is_encoder_decoder:
        if inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
            inputs = {**inputs, "decoder_input_ids": lm.prepare_decoder_input_ids_from_labels(labels=labels)}
        logits = lm(**inputs, use_cache=False).logits  # aligned with the labels: no shift
        summed = sliced_cross_entropy(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX)
        return summed / (labels != IGNORE_INDEX).sum()
    if not slices_logits(lm):
        return lm(**inputs, labels=labels, use_cache=False).loss
    if length_groups is None:
        length_groups = 2 if labels.device.type == "cpu" else 1
    mask = inputs.get("attention_mask")
    if drop_right_padding_mask and mask is not None and right_padded(mask):
        inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
    width = labels.shape[1]
    # Each row's extent: up to its last real token (its length when padded on the right).
    extents = width - mask.flip(1).int().argmax(1) if mask is not None else labels.new_full(labels.shape[:1], width)
    total = labels.new_zeros((), dtype=torch.float)
    for rows in extents.argsort().chunk(length_groups):
        cut = int(extents[rows].max())
        group = {k: v[rows, :cut] if _is_per_token(v, labels) else v for k, v in inputs.items()}
        targets = labels[rows, 1:cut]
        predicts = nn.functional.pad(targets != IGNORE_INDEX, (0, 1))  # position t predicts token t + 1
        if on_group is not None:
            on_group(rows)
        logits = lm(**group, use_cache=False, logits_to_keep=predicts).logits
        total = total + sliced_cross_entropy(logits, targets[predicts[:, :-1]], IGNORE_INDEX)
    return total / (labels[:, 1:] != IGNORE_INDEX).sum()


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row's real tokens come first (one host-device synchronisation on accelerators)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _is_per_token(value: Any, labels: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape[:2] == labels.shape
