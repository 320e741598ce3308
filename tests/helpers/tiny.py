"""Tiny random transformers models built from configs (seconds on a CPU), and batches of token rows for them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from prefix_lightning.methods.loss import IGNORE_INDEX

VOCAB, PAD = 100, 1
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama": dict(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    "bart": dict(
        encoder_layers=2,
        decoder_layers=2,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        forced_eos_token_id=None,
    ),
    "t5": dict(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    ),
}
# UMT5 is T5 with a relative-attention table in every layer instead of each stack's first.
FAMILIES["umt5"] = FAMILIES["t5"]
# Real words of a prefix (invariant 1), and rows of different lengths.
WORDS = torch.tensor([5, 6, 7, 8])
ROWS = [torch.tensor([10, 11, 12, 13, 14]), torch.tensor([20, 21]), torch.tensor([30, 31, 32])]
# (source, target) token pairs of different lengths, to train on.
PAIRS = [([10, 11, 12], [30, 31, 32, 33]), ([20, 21], [40, 41]), ([50, 51, 52, 53], [60, 61, 62])]


def tiny_lm(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random model of ``family`` (a transformers model type; gpt2, llama, bart, t5 and umt5 have tiny
    defaults here) in eval mode; ``overrides`` change its config (more layers, ``initializer_range``, ...). The same
    arguments give the same weights."""
    config = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        **{**FAMILIES.get(family, {}), **overrides},
    )
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config).eval()


def pad_batch(rows: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded with PAD to one width, on the left (prompts to generate from) or the right (training)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def padded(rows: list[list[int]], fill: int, left: bool = False) -> torch.Tensor:
    """``rows`` filled with ``fill`` to one width, on the left or the right."""
    width = max(map(len, rows))
    return torch.tensor([[fill] * (width - len(r)) * left + r + [fill] * (width - len(r)) * (not left) for r in rows])


def training_batch(encoder_decoder: bool, pairs: list[tuple[list[int], list[int]]] = PAIRS) -> dict[str, torch.Tensor]:
    """``pairs`` right-padded; causal rows are source + target with the source and padding labelled IGNORE_INDEX."""
    if encoder_decoder:
        ids = padded([s for s, _ in pairs], PAD)
        return {
            "input_ids": ids,
            "attention_mask": (ids != PAD).long(),
            "labels": padded([t for _, t in pairs], IGNORE_INDEX),
        }
    ids = padded([s + t for s, t in pairs], PAD)
    labels = padded([[IGNORE_INDEX] * len(s) + t for s, t in pairs], IGNORE_INDEX)
    mask = padded([[1] * len(s + t) for s, t in pairs], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
