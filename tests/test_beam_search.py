"""Our beam search (prefix_lightning.decoding) against transformers' own, on tiny random GPT-2 and Llama (GQA).

The reference is ``PrefixModel.generate`` forced onto transformers' ``generate`` (the path every call that is
not a plain beam search takes), on the very same model and prefix. The sequences must be identical, also when
inputs end at different steps and their rows are dropped from the running batch (checked by counting the rows
of every forward).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

import prefix_lightning.decoding.routes as routes
from prefix_lightning import PrefixBank, PrefixModel
from prefix_lightning.decoding import (
    beam_search,
    beam_search_options,
    generation_mask,
    rows_per_input,
    tokens_to_generate,
)
from tests.helpers.decoding import (
    END,
    LENGTHS,
    ending_lm,
    left_padded,
    one_thread,  # noqa: F401 (a fixture, autouse here)
    ours_against_transformers,
    prefixed,
    transformers_search,
)
from tests.helpers.tiny import PAD, VOCAB, tiny_lm

NEW = 15


def compare(model: PrefixModel, monkeypatch: pytest.MonkeyPatch, **options) -> tuple[torch.Tensor, list[int]]:
    """Our sequences on the left-padded prompts (asserted equal to transformers') and the rows of each of our
    forwards: the prompt (one row per input), then a row per beam of the inputs left."""
    return ours_against_transformers(model, monkeypatch, *left_padded(), **options)


BASE = dict(max_new_tokens=NEW, pad_token_id=PAD)


def dropped(rows: list[int]) -> int:
    """How many times inputs were dropped from the running batch."""
    return len(set(rows[1:])) - 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [2, 3, 4, 5])
def test_same_sequences_as_transformers_with_inputs_ending_early(kind, beams, monkeypatch) -> None:
    model = prefixed(kind)
    sequences, rows = compare(model, monkeypatch, num_beams=beams, eos_token_id=END, **BASE)
    new = sequences[:, max(LENGTHS) :]
    assert len(set((new != PAD).sum(1).tolist())) >= 3  # outputs of different lengths
    assert rows[0] == len(LENGTHS)  # the prompt once per input, not once per beam
    assert rows[1] == beams * len(LENGTHS) and sorted(rows[1:], reverse=True) == rows[1:]
    assert all(r % beams == 0 for r in rows[1:])
    assert dropped(rows) >= 2 and rows[-1] < rows[1]


SETTINGS = {
    "bad_words": dict(bad_words_ids=[[7], [9], [48], [44]]),
    "summarization": dict(length_penalty=0.8, no_repeat_ngram_size=3, min_new_tokens=4, early_stopping=True),
    "early_stopping": dict(early_stopping=True),
    "never": dict(early_stopping="never", length_penalty=1.3),
    "negative_penalty": dict(length_penalty=-0.5, bad_words_ids=[[5]]),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("beams", [2, 5])
def test_same_sequences_with_generation_options(kind, setting, beams, monkeypatch) -> None:
    model = prefixed(kind)
    options = dict(num_beams=beams, **BASE, **SETTINGS[setting])
    _, rows = compare(model, monkeypatch, eos_token_id=END, **options)
    if setting != "never":  # which waits for the longest a beam may get: inputs seldom end before the last step
        assert dropped(rows)
    for eos in (44, 48, [44, END]):  # other end tokens, several at once
        compare(model, monkeypatch, eos_token_id=eos, **options)


def test_min_new_tokens_and_bad_words_hold() -> None:
    model = prefixed("llama")
    ids, mask = left_padded()
    eos, banned = END, [[44], [4]]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=3,
        eos_token_id=eos,
        bad_words_ids=banned,
        min_new_tokens=5,
        **BASE,
    )
    new = out[:, ids.shape[1] :]
    assert not (new[:, :5] == eos).any()
    assert not torch.isin(new, torch.tensor([44, 4])).any()


@pytest.mark.parametrize("prefix_kind", ["infix", "embedding"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_other_prefix_kinds(kind, prefix_kind, monkeypatch) -> None:
    model = prefixed(kind, prefix_kind)
    if prefix_kind == "embedding":
        model.init_prefix_from_vocabulary(torch.Generator().manual_seed(1))
    for beams in (2, 4):
        _, rows = compare(model, monkeypatch, num_beams=beams, eos_token_id=END, **BASE)
        assert dropped(rows)
    assert model.injector.prompt_width is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_read_from_the_cache_changes_nothing(kind, monkeypatch) -> None:
    """After the prompt, the prefix moves into the cache and the attention stops prepending it (the prefix is
    turned off for the decoding steps); the sequences are those of the prefix prepended at every step."""
    model = prefixed(kind)
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, num_beams=3, eos_token_id=END, **BASE)
    turned_off = []
    disabled = PrefixModel.prefix_disabled

    def spied(self):
        turned_off.append(True)
        return disabled(self)

    with monkeypatch.context() as patch:
        patch.setattr(PrefixModel, "prefix_disabled", spied)
        cached = model.generate(**options)
        assert turned_off
    with monkeypatch.context() as patch:
        patch.setattr(PrefixModel, "_cached_prefix", lambda self: None)
        assert torch.equal(model.generate(**options), cached)
    # Where the prefix is off, none comes into the cache.
    with model.prefix_disabled():
        bare = model.generate(**options)
        with transformers_search(monkeypatch):
            assert torch.equal(model.generate(**options), bare)
    assert not torch.equal(bare, cached)


def test_no_padding_one_token_prompts_and_no_mask(monkeypatch) -> None:
    """Prompts without padding (generate drops the mask), of one token (no prompt cache), and a mask left for
    generate to infer from the pad token."""
    model = prefixed("llama")
    full = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    for ids in (full, full[:, :1]):
        options = dict(num_beams=3, eos_token_id=END, **BASE)
        ours = model.generate(input_ids=ids, **options)
        with transformers_search(monkeypatch):
            assert torch.equal(ours, model.generate(input_ids=ids, **options))
    ids, mask = left_padded()
    options = dict(num_beams=3, eos_token_id=END, **BASE)
    ours = model.generate(input_ids=ids, **options)
    assert torch.equal(generation_mask(ids, PAD, END), mask)
    with transformers_search(monkeypatch):
        assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, **options))


def test_a_pad_id_of_0_fills_after_the_end_as_transformers_does(monkeypatch) -> None:
    """transformers reads a pad id of 0 as none and fills the positions after a hypothesis's end with the end token."""
    model = prefixed("gpt2")
    sequences, _ = compare(model, monkeypatch, num_beams=3, eos_token_id=END, max_new_tokens=NEW, pad_token_id=0)
    new = sequences[:, max(LENGTHS) :]
    assert not (new == 0).any() and ((new == END).sum(1) > 1).any()


def test_an_end_token_as_pad_masks_nothing(monkeypatch) -> None:
    """generate infers no mask where the pad token is an end token: an end token inside a prompt is read."""
    model = prefixed("llama")
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))
    ids[:, 2] = END
    options = dict(input_ids=ids, num_beams=3, eos_token_id=END, max_new_tokens=NEW, pad_token_id=END)
    ours = model.generate(**options)
    with transformers_search(monkeypatch):
        assert torch.equal(ours, model.generate(**options))
    assert not torch.equal(ours, model.generate(**{**options, "attention_mask": (ids != END).long()}))


def test_several_sequences_per_input_without_a_mask_read_the_padding_generate_infers() -> None:
    """Outside the beam search (num_return_sequences), the prompt is run once per input only where its padding is
    known: a padded batch given no mask decodes as with the mask generate infers from the pad token."""
    model = prefixed("llama")
    ids, mask = left_padded()
    options = dict(input_ids=ids, num_beams=3, num_return_sequences=2, eos_token_id=END, **BASE)
    assert torch.equal(model.generate(**options), model.generate(**options, attention_mask=mask))


@pytest.mark.parametrize("given", ["call", "generation_config"])
def test_several_sequences_per_input_with_a_cache_implementation_decode_as_with_the_dynamic_cache(given: str) -> None:
    """A cache implementation asked for (the call's or the LM's generation config) leaves generate to build its own
    cache: it refuses the prompt's cache that the route would hand it."""
    model = prefixed("llama")
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2, eos_token_id=END, **BASE)
    expected = model.generate(**options)
    if given == "call":
        options["cache_implementation"] = "static"
    else:
        model.lm.generation_config.cache_implementation = "static"
    assert torch.equal(model.generate(**options), expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_plain_lm(kind) -> None:
    """The core function on a bare LM, against its own generate (no prompt cache given)."""
    lm = ending_lm(kind)
    ids, mask = left_padded()
    options = dict(num_beams=4, eos_token_id=END, length_penalty=0.8, **BASE)
    rows: list[int] = []
    ours = beam_search(lm, ids, mask, on_step=lambda step, count: rows.append(count), **options)
    assert torch.equal(ours, lm.generate(input_ids=ids, attention_mask=mask, **options))
    assert rows[0] == len(LENGTHS) and rows[1] == 4 * len(LENGTHS)


def test_greedy_and_unsupported_options_use_transformers(monkeypatch) -> None:
    model = prefixed("gpt2")
    ids, mask = left_padded()

    def refuse(*args, **kwargs):
        raise AssertionError("beam_search should not run")

    calls = [
        dict(num_beams=1),
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=3, do_sample=True),
        dict(num_beams=3, repetition_penalty=1.3),
        dict(num_beams=3, logits_processor=LogitsProcessorList()),
    ]
    for call in calls:
        options = dict(input_ids=ids, attention_mask=mask, eos_token_id=END, **BASE, **call)
        with monkeypatch.context() as patch:
            patch.setattr(routes, "beam_search", refuse)
            torch.manual_seed(0)
            got = model.generate(**options)
        with transformers_search(monkeypatch):
            torch.manual_seed(0)
            assert torch.equal(got, model.generate(**options))
    with monkeypatch.context() as patch:
        patch.setattr(routes, "beam_search", refuse)
        scored = model.generate(input_ids=ids, attention_mask=mask, num_beams=3, **BASE, return_dict_in_generate=True)
    assert scored.sequences.shape[0] == len(LENGTHS)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("rows", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_use_cache_false_changes_the_speed_not_the_sequences(kind, rows) -> None:
    """Without a cache transformers reruns the whole sequence each step; no route may hand it one anyway."""
    model = prefixed(kind)
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, eos_token_id=END, **BASE, **rows)
    assert torch.equal(model.generate(**options, use_cache=False), model.generate(**options))


def test_options_layered_like_generate() -> None:
    lm = tiny_lm("gpt2")
    ids = torch.ones(1, 3, dtype=torch.long)
    config = GenerationConfig(num_beams=4, max_new_tokens=9, length_penalty=0.5)
    options = beam_search_options(lm, {"input_ids": ids, "generation_config": config, "length_penalty": 2.0})
    assert options is not None
    assert (options["num_beams"], options["max_new_tokens"], options["length_penalty"]) == (4, 9, 2.0)
    assert (options["eos_token_id"], options["pad_token_id"], options["early_stopping"]) == (2, PAD, False)
    assert options["bad_words_ids"] is None and options["min_new_tokens"] == 0
    for refused in (
        {"num_beams": 1},
        {"max_new_tokens": None, "max_length": 30},
        {"output_scores": True},
        {"top_k": 5, "do_sample": True},
        {"streamer": object()},
        {"forced_eos_token_id": 2},
        {"min_length": 6},  # counts the prompt, unlike min_new_tokens
    ):
        assert beam_search_options(lm, {"input_ids": ids, "num_beams": 3, "max_new_tokens": 5, **refused}) is None
    # options that change nothing without sampling are accepted
    assert beam_search_options(lm, {"input_ids": ids, "num_beams": 3, "max_new_tokens": 5, "temperature": 0.7})


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_the_tokens_generate_adds_are_counted_as_transformers_adds_them(kind: str) -> None:
    """The position check reads how many tokens generate may add: max_new_tokens (given, or of the generation
    config), else max_length less the prompt, or less the decoder's start token of an encoder-decoder."""
    lm = tiny_lm(kind)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    start = 1 if lm.config.is_encoder_decoder else prompt.shape[1]
    settings = dict(min_new_tokens=0, eos_token_id=None, pad_token_id=PAD)
    configured = GenerationConfig(max_new_tokens=4)
    for options in ({"max_new_tokens": 3}, {"max_length": 9}, {"generation_config": configured}):
        added = lm.generate(prompt, **options, **settings).shape[1] - start
        assert tokens_to_generate(lm, {"input_ids": prompt, **options}) == added
    assert tokens_to_generate(lm, {"input_ids": prompt, "max_new_tokens": "3"}) == 0  # transformers says what is wrong


def test_rows_per_input_are_the_beams_or_the_sequences_returned() -> None:
    """Sampling several sequences makes one row per sequence (the PEFT baseline's prefix needs one per row)."""
    defaults = GenerationConfig()
    assert rows_per_input(defaults, {}) == 1
    assert rows_per_input(defaults, {"num_beams": 3, "num_return_sequences": 2}) == 3
    assert rows_per_input(defaults, {"do_sample": True, "num_return_sequences": 4}) == 4
    configured = GenerationConfig(do_sample=True, num_return_sequences=5)
    assert rows_per_input(defaults, {"generation_config": configured}) == 5


def test_beams_or_sequences_below_one_are_refused_by_name() -> None:
    """transformers divides by num_beams (0) or makes a tensor of that many rows (-1)."""
    model = PrefixModel(tiny_lm("gpt2"), length=2, hidden_dim=8)
    prompt = torch.tensor([[5, 6, 7]])
    for option, value in (("num_beams", 0), ("num_beams", -1), ("num_return_sequences", 0)):
        with pytest.raises(ValueError, match=f"{option} must be a positive integer, got {value}"):
            model.generate(prompt, max_new_tokens=2, **{option: value})


def test_a_right_padded_decoder_only_batch_is_refused() -> None:
    """Generation goes on from each row's last column: a right-padded row went on from its padding into other text
    than the row alone gives, without a word. An encoder-decoder's source may be padded either way."""
    ids = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    right_padded = torch.tensor([[1, 1, 1], [1, 1, 0]])
    model = PrefixModel(tiny_lm("gpt2"), length=2, hidden_dim=8)
    bank = PrefixBank(tiny_lm("gpt2"))
    bank.add("task", model)
    for generate in (model.generate, partial(bank.generate, prefixes=["task", None])):
        for beams in (1, 3):
            with pytest.raises(ValueError, match=r"row\(s\) \[1\] end in padding.*pad a batch on the left"):
                generate(ids, attention_mask=right_padded, num_beams=beams, max_new_tokens=2, pad_token_id=PAD)
        left_padded = generate(
            torch.tensor([[5, 6, 7], [PAD, 8, 9]]), attention_mask=right_padded.flip(1), max_new_tokens=2
        )
        assert left_padded.shape[0] == 2
    seq2seq = PrefixModel(tiny_lm("bart"), length=2, hidden_dim=8)
    assert seq2seq.generate(ids, attention_mask=right_padded, max_new_tokens=2).shape[0] == 2
