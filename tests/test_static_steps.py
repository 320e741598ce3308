"""The beam search's static steps (prefix_lightning.decoding.steps: the route of CUDA, where each step is replayed
from a graph) give transformers' sequences, here run eager on the CPU: every beam the search started with keeps a
row, the cache is as long as the longest output, and the mask hides the columns not yet written. The graph itself is
checked by tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from prefix_lightning.decoding import beam_search
from prefix_lightning.decoding.steps import static_steps_pay
from tests.helpers.decoding import (
    END,
    LENGTHS,
    ending_lm,
    left_padded,
    one_thread,  # noqa: F401 (a fixture, autouse here)
    ours_against_transformers,
    prefixed,
    rows_per_forward,
    static_steps,
)
from tests.helpers.tiny import PAD, VOCAB

BASE = dict(max_new_tokens=15, pad_token_id=PAD)


def static_against_transformers(model, monkeypatch, ids, mask, **options) -> tuple[torch.Tensor, list[int]]:
    """Our sequences through the static steps (asserted equal to transformers' beam search) and the rows of each of
    our forwards."""
    with static_steps(monkeypatch):
        return ours_against_transformers(model, monkeypatch, ids, mask, **options)


def test_static_steps_are_the_route_of_cuda_only() -> None:
    lm = ending_lm("llama")
    assert static_steps_pay(lm, torch.device("cuda"))
    assert not static_steps_pay(lm, torch.device("cpu"))
    lm.model.layers[0].mlp.up_proj.weight.ds_id = 3  # as DeepSpeed's ZeRO-3 marks the parameters it partitions
    assert not static_steps_pay(lm, torch.device("cuda"))  # (FSDP: tests/test_distributed.py)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [2, 5])
@pytest.mark.parametrize(
    "options",
    [
        dict(eos_token_id=END),
        dict(eos_token_id=[44, END], length_penalty=0.8, no_repeat_ngram_size=3, min_new_tokens=4),
        dict(eos_token_id=END, early_stopping="never", length_penalty=1.3, bad_words_ids=[[7], [9]]),
    ],
    ids=["plain", "summarization", "never"],
)
def test_static_steps_give_transformers_sequences(kind, beams, options, monkeypatch) -> None:
    """Inputs end at different steps; their rows keep computing (unread) where the growing steps drop them."""
    model = prefixed(kind)
    ids, mask = left_padded()
    sequences, rows = static_against_transformers(model, monkeypatch, ids, mask, num_beams=beams, **BASE, **options)
    assert rows[0] == len(LENGTHS) and len(rows) > 2
    assert set(rows[1:]) == {beams * len(LENGTHS)}
    if options.get("early_stopping") != "never":  # which waits for the longest a beam may get
        assert len(set((sequences[:, ids.shape[1] :] != PAD).sum(1).tolist())) >= 3  # inputs ended apart


@pytest.mark.parametrize("prefix_kind", ["infix", "embedding"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_static_steps_of_other_prefix_kinds(kind, prefix_kind, monkeypatch) -> None:
    model = prefixed(kind, prefix_kind)
    if prefix_kind == "embedding":
        model.init_prefix_from_vocabulary(torch.Generator().manual_seed(1))
    ids, mask = left_padded()
    _, rows = static_against_transformers(model, monkeypatch, ids, mask, num_beams=3, eos_token_id=END, **BASE)
    assert set(rows[1:]) == {3 * len(LENGTHS)}


def test_static_steps_without_padding_or_mask(monkeypatch) -> None:
    """No padding (generate drops the mask: the static mask still hides the columns not yet written), one-token
    prompts, and a search of one step (no step after the prompt)."""
    model = prefixed("llama")
    full = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    for ids in (full, full[:, :1]):
        _, rows = static_against_transformers(model, monkeypatch, ids, None, num_beams=3, eos_token_id=END, **BASE)
        assert set(rows[1:]) == {12}
    ids, mask = left_padded()
    for new in (1, 2):
        options = dict(BASE, max_new_tokens=new)
        static_against_transformers(model, monkeypatch, ids, mask, num_beams=4, eos_token_id=END, **options)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_static_steps_of_a_plain_lm(kind) -> None:
    lm = ending_lm(kind)
    ids, mask = left_padded()
    options = dict(num_beams=4, eos_token_id=END, length_penalty=0.8, **BASE)
    with rows_per_forward(lm) as rows:
        ours = beam_search(lm, ids, mask, static=True, **options)
    assert torch.equal(ours, lm.generate(input_ids=ids, attention_mask=mask, **options))
    assert set(rows[1:]) == {4 * len(LENGTHS)}


def test_an_lm_whose_attention_takes_another_mask_keeps_the_growing_steps() -> None:
    """The static mask is SDPA's (booleans); eager attention adds a float mask."""
    lm = ending_lm("llama")
    lm.set_attn_implementation("eager")
    ids, mask = left_padded()
    options = dict(num_beams=4, eos_token_id=END, **BASE)
    with rows_per_forward(lm) as rows:
        ours = beam_search(lm, ids, mask, static=True, **options)
    assert torch.equal(ours, lm.generate(input_ids=ids, attention_mask=mask, **options))
    assert rows[-1] < rows[1]  # inputs left the search: growing steps
