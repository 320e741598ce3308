"""Decoding a (prefixed) LM: the routes per call, a beam search equal to transformers' (that drops finished inputs
on the CPU and replays its steps from a CUDA graph on CUDA), the CPU's packed frozen weights, and the generated
text."""

from prefix_lightning.decoding.beam_search import CachedPrefix, beam_search, beam_search_options
from prefix_lightning.decoding.masks import generation_mask, positions_from_mask
from prefix_lightning.decoding.packed_linear import PackedWeights
from prefix_lightning.decoding.routes import generate, rows_per_input, tokens_to_generate
from prefix_lightning.decoding.texts import generated_texts

__all__ = [
    "CachedPrefix",
    "PackedWeights",
    "beam_search",
    "beam_search_options",
    "generate",
    "generated_texts",
    "generation_mask",
    "positions_from_mask",
    "rows_per_input",
    "tokens_to_generate",
]
