"""Sliding-window attention (Mistral with ``sliding_window``): the prefix is an always-visible sink in front of
the window (prefix_lightning/prefix/attention.py), in the forward pass and in decoding with the window's cache."""

from __future__ import annotations

import torch

from prefix_lightning import PrefixConfig, PrefixModel
from tests.helpers.families import GQA, check_decoding
from tests.helpers.tiny import WORDS, pad_batch, tiny_lm

WINDOW = 3
MISTRAL = dict(GQA, sliding_window=WINDOW)
ROWS = [torch.tensor([10, 11, 12, 13, 14, 15, 16]), torch.tensor([20, 21, 22, 23, 24])]


def sink_mask(words: int, tokens: int) -> torch.Tensor:
    """[w; x]'s mask with w always visible to x: w's rows keep the model's own sliding causal pattern (as when
    the prefix was computed from w alone), x's rows see every w column plus their window over x."""
    size = words + tokens
    query, key = torch.arange(size)[:, None], torch.arange(size)[None, :]
    window = (key <= query) & (key > query - WINDOW)
    sink = (query >= words) & (key < words)
    return (window | sink)[None, None]


def test_prefix_columns_stay_visible_beyond_the_window() -> None:
    reference = tiny_lm("mistral", **MISTRAL)
    model = PrefixModel(tiny_lm("mistral", **MISTRAL), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            tokens = torch.cat([WORDS, row])[None]
            expected = reference(input_ids=tokens, attention_mask=sink_mask(len(WORDS), len(row))).logits
            torch.testing.assert_close(logits[i][mask[i].bool()], expected[0, len(WORDS) :], atol=1e-4, rtol=0)
            # The plain window over [w; x] would hide w from x's later tokens: a different result.
            plain = reference(input_ids=tokens).logits[0, len(WORDS) :]
            assert (plain[-1] - expected[0, -1]).abs().max() > 1e-3


def test_decoding_past_the_window_keeps_the_sink() -> None:
    """Decoding with the window's cache, far beyond the window, still reads the prefix (as the uncached loop
    does), and batches equal single inputs."""
    model = PrefixModel(tiny_lm("mistral", **MISTRAL), PrefixConfig(length=3)).eval()
    check_decoding(model, ROWS, steps=6)


def test_real_word_equivalence_holds_while_words_and_input_fit_the_window() -> None:
    """The documented rule: a prefix from w equals [w; x] while all of [w; x] fits in the window; once only x
    fits, [w; x]'s window has slid past w's first token, which the prefix still shows."""
    window = len(WORDS) + 3
    fields = dict(GQA, sliding_window=window)
    reference = tiny_lm("mistral", **fields)
    model = PrefixModel(tiny_lm("mistral", **fields), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    with torch.no_grad():
        for tokens, equal in ((3, True), (4, False)):
            row = torch.arange(10, 10 + tokens)
            got = model(input_ids=row[None]).logits[0]
            expected = reference(input_ids=torch.cat([WORDS, row])[None]).logits[0, len(WORDS) :]
            assert torch.allclose(got, expected, atol=1e-4) == equal, tokens
