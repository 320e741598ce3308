"""The model-family matrix (docs/design.md, invariant 7): tiny configs of every supported family, and the decoding
check each family's prefix must pass."""

from __future__ import annotations

from typing import Any

import torch

from prefix_lightning import PrefixModel
from tests.helpers.tiny import FAMILIES, PAD, VOCAB, pad_batch

TARGET = torch.tensor([40, 41, 42])
LAYERS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
GQA = dict(LAYERS, num_key_value_heads=2)

DECODERS = {
    "gpt2": ("gpt2", FAMILIES["gpt2"]),
    "llama_gqa": ("llama", GQA),
    "qwen2": ("qwen2", GQA),
    "qwen3": ("qwen3", dict(GQA, head_dim=8)),
    "mistral": ("mistral", dict(GQA, sliding_window=None)),
    "phi3": ("phi3", GQA),
    "gemma": ("gemma", dict(GQA, head_dim=8)),
    "gemma3": ("gemma3_text", dict(GQA, head_dim=8, sliding_window=64)),
    "gpt_neox": ("gpt_neox", LAYERS),
    "opt": ("opt", dict(LAYERS, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)),
    # Per-layer shapes: the full-attention layer has 1 key/value head of size 16, the sliding one 2 of size 8.
    "gemma4_per_layer_heads": (
        "gemma4_text",
        dict(
            GQA,
            head_dim=8,
            global_head_dim=16,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=64,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
        ),
    ),
}
T5: dict[str, Any] = FAMILIES["t5"]
ENCODER_DECODERS = {
    "bart": ("bart", FAMILIES["bart"]),
    "t5": ("t5", T5),
    "umt5": ("umt5", FAMILIES["umt5"]),
    # sinusoidal positions, computed from the ids' shape
    "pegasus": ("pegasus", FAMILIES["bart"]),
    "marian": ("marian", FAMILIES["bart"]),
    "flan_t5_gated": ("t5", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def check_decoding(model: PrefixModel, rows: list[torch.Tensor], steps: int) -> None:
    """Invariant 3 for a decoder-only ``model``: greedy decoding equals the uncached argmax loop; beam search over
    a left-padded batch equals one input at a time."""
    settings = dict(max_new_tokens=steps, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    beams = dict(settings, num_beams=3)
    ids, mask = pad_batch(rows, left=True)
    with torch.no_grad():
        greedy = model.generate(input_ids=rows[0][None], **settings)[0]
        stepwise = rows[0][None]
        for _ in range(steps):
            step = model(input_ids=stepwise, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            stepwise = torch.cat([stepwise, step], dim=1)
        batched = model.generate(input_ids=ids, attention_mask=mask, **beams)
        singles = [model.generate(input_ids=row[None], **beams)[0] for row in rows]
    assert torch.equal(greedy, stepwise[0])
    for i, (row, single) in enumerate(zip(rows, singles, strict=True)):
        assert torch.equal(batched[i, ids.shape[1] - len(row) :], single)
