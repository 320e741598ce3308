"""The method's invariants 1-5 (docs/design.md) on tiny random GPT-2, Llama with grouped-query attention, BART and T5
(every family's real-word equivalence: test_model_families.py)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

from prefix_lightning import PrefixBank, PrefixConfig, PrefixModel, UnsupportedModelError
from prefix_lightning.methods import IGNORE_INDEX
from prefix_lightning.prefix import attention
from prefix_lightning.prefix.attention import record_attention_calls
from prefix_lightning.prefix.inputs import check_inputs
from prefix_lightning.prefix.multitask import MultiTaskPrefix
from tests.helpers.checkpointing import assert_checkpointing_keeps_gradients
from tests.helpers.tiny import PAD, ROWS, VOCAB, WORDS, pad_batch, tiny_lm, training_batch


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("left", [True, False])
def test_real_word_prefix_equals_prepended_words(kind: str, left: bool) -> None:
    """Invariant 1: layer mapping, kv-head layout, mask and positions all at once."""
    reference = tiny_lm(kind)
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    ids, mask = pad_batch(ROWS, left)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            expected = reference(input_ids=torch.cat([WORDS, row])[None]).logits[0, len(WORDS) :]
            got = logits[i][mask[i].bool()]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_real_word_prefix_without_padding_uses_explicit_causal_mask() -> None:
    reference = tiny_lm("llama")
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    with torch.no_grad():
        got = model(input_ids=ROWS[0][None]).logits[0]
        expected = reference(input_ids=torch.cat([WORDS, ROWS[0]])[None]).logits[0, len(WORDS) :]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_grouped_heads_train_as_transformers_repeated_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix's causal attention with the key/value heads left grouped (where the flash kernel takes them so, on a
    GPU in half precision) gives the loss and gradients of transformers' path, which repeats them to every query
    head."""
    model = PrefixModel(tiny_lm("llama"), length=3)  # 4 query heads, 2 key/value heads
    batch = training_batch(encoder_decoder=False)

    def loss_and_gradients() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model.loss(drop_right_padding_mask=True, length_groups=1, **batch)
        loss.backward()
        return [loss.detach(), *(parameter.grad.clone() for parameter in model.trainable_parameters())]

    repeated = loss_and_gradients()
    calls = []
    grouped_call = attention.grouped_causal_attention
    monkeypatch.setattr(attention, "flash_takes_grouped_heads", lambda *_: True)
    monkeypatch.setattr(attention, "grouped_causal_attention", lambda *a, **k: calls.append(1) or grouped_call(*a, **k))
    grouped = loss_and_gradients()
    assert len(calls) == model.lm.config.num_hidden_layers
    for got, expected in zip(grouped, repeated, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unshifted_prefix_rows_do_not_depend_on_their_left_padding(kind: str) -> None:
    """With shift_positions=false real tokens keep positions 0, 1, ... counted from each row's first real token,
    as generate and a PrefixBank count them: a left-padded row's logits are the row's alone (with rotary
    positions, the distance to the prefix would otherwise grow with the padding)."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16, shift_positions=False)).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            alone = model(input_ids=row[None]).logits[0]
            torch.testing.assert_close(logits[i][mask[i].bool()], alone, atol=1e-5, rtol=0)


def _positions_seen(model: PrefixModel, **inputs: torch.Tensor) -> torch.Tensor:
    """The position ids the LM's own forward receives (after the prefix's hook has moved them)."""
    seen: list[torch.Tensor] = []
    hook = model.lm.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("shift", [True, False])
def test_real_tokens_start_at_position_l_only_when_shifted(kind: str, shift: bool) -> None:
    """Left-padded rows: each row's real tokens take positions L, L+1, ... (shift_positions=true) or 0, 1, ...
    (false), counted from its first real token."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16, shift_positions=shift)).eval()
    ids, mask = pad_batch(ROWS, left=True)
    positions = _positions_seen(model, input_ids=ids, attention_mask=mask)
    start = 3 if shift else 0
    for i, row in enumerate(ROWS):
        assert positions[i][mask[i].bool()].tolist() == list(range(start, start + len(row)))


@pytest.mark.parametrize("shift", [True, False])
def test_bart_learned_positions_move_only_when_shifted(shift: bool) -> None:
    """BART's position embeddings take no ids: its embed_positions modules give the embeddings of positions moved
    by L (shift_positions=true), or the plain model's (false, the paper's BART setting)."""
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=3, hidden_dim=16, shift_positions=shift)).eval()
    reference = tiny_lm("bart")
    ids = ROWS[0][None]
    decoder = ROWS[1][None]
    outputs: dict[str, list[torch.Tensor]] = {"model": [], "plain": []}
    hooks = [
        module.register_forward_hook(lambda module, args, output, key=key: outputs[key].append(output))
        for key, lm in (("model", model.lm), ("plain", reference))
        for module in (lm.model.encoder.embed_positions, lm.model.decoder.embed_positions)
    ]
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=decoder)
        reference(input_ids=ids, decoder_input_ids=decoder)
        table = reference.model.encoder.embed_positions.weight
        offset = reference.model.encoder.embed_positions.offset
    for hook in hooks:
        hook.remove()
    start = offset + (3 if shift else 0)
    torch.testing.assert_close(outputs["model"][0][0], table[start : start + ids.shape[1]])
    if not shift:
        for got, plain in zip(outputs["model"], outputs["plain"], strict=True):
            torch.testing.assert_close(got, plain, atol=0, rtol=0)


def test_a_flop_counter_sees_the_prefixed_forward() -> None:
    """Without a mask, causal attention with a prefix uses SDPA's bottom-right causal bias, a tensor subclass that
    cannot be made under a dispatch mode: under torch's FLOP counter the forward still runs, with the same logits,
    and counts the attention over the prefix columns."""
    from torch.utils.flop_counter import FlopCounterMode

    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with FlopCounterMode(display=False) as counter:
            counted = model(input_ids=ids).logits
    torch.testing.assert_close(counted, expected)
    assert counter.get_total_flops() > 0


def test_bart_encoder_real_word_equivalence() -> None:
    reference = tiny_lm("bart")
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=len(WORDS), reparam="none"))
    assert {site.group for site in model.sites} == {"encoder", "decoder", "cross"}
    assert len(model.sites) == 6
    model.init_prefix_from_tokens(WORDS)
    ids, mask = pad_batch(ROWS, left=False)
    with torch.no_grad():
        model._materialize()
        hidden = model.lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, row in enumerate(ROWS):
            expected = reference.get_encoder()(input_ids=torch.cat([WORDS, row])[None]).last_hidden_state[0, 4:]
            torch.testing.assert_close(hidden[i, : len(row)], expected, atol=1e-4, rtol=0)


def test_bart_decoder_given_embeddings_moves_its_positions_as_given_ids() -> None:
    """decoder_inputs_embeds instead of decoder_input_ids: BART's decoder passes its position embedding no ids, and
    the shifted positions are the same."""
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids, mask = pad_batch(ROWS, left=False)
    target = torch.tensor([[2, 40, 41]]).expand(len(ROWS), -1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        embeds = model.lm.get_input_embeddings()(target)
        got = model(input_ids=ids, attention_mask=mask, decoder_inputs_embeds=embeds).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """The causal 4-D float mask of a right-padded 2-D ``mask``: 0 where a query sees a key, the minimum where not."""
    width, hidden = mask.shape[1], torch.finfo(torch.float32).min
    causal = torch.full((width, width), hidden).triu(1).expand(mask.shape[0], 1, width, width)
    return causal.masked_fill(~mask.bool()[:, None, None, :], hidden)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_4d_additive_mask_sees_the_prefix_as_a_2d_mask_does(kind: str) -> None:
    """A caller's own 4-D float mask takes the additive branch of the mask widening: the prefix columns get 0
    (seen), the logits are those of the 2-D mask (right padding: positions count alike from either)."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids, mask = pad_batch(ROWS, left=False)
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=_additive(mask)).logits
        with model.prefix_disabled():
            plain = model.lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert not torch.allclose(expected[real], plain[real], atol=1e-3)  # the prefix counts in what is compared


def test_prefix_dropout_applies_in_training_only() -> None:
    """prefix.dropout drops entries of the materialized prefix in training; in eval (validation, decoding) the
    model gives the logits of the same prefix without dropout."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3, hidden_dim=16, dropout=0.5))
    undropped = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3, hidden_dim=16)).eval()
    undropped.encoders.load_state_dict(model.encoders.state_dict())
    ids = ROWS[0][None]
    with torch.no_grad():
        expected = undropped(input_ids=ids).logits
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected)
        model.train()
        torch.manual_seed(1)
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(first, expected, atol=1e-4) and not torch.allclose(first, second, atol=1e-4)


def test_prefix_changes_the_output_and_disabling_restores_the_plain_lm() -> None:
    reference = tiny_lm("gpt2")
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3))
    ids = ROWS[0][None]
    with torch.no_grad():
        plain = reference(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-3)
        with model.prefix_disabled():
            torch.testing.assert_close(model.lm(input_ids=ids).logits, plain)


def test_the_loss_drops_the_padding_mask_only_where_chosen_and_right_padded() -> None:
    """The GPU path (a right-padded batch without its mask) is chosen per device: by default the CPU keeps its
    masked path; asked to drop it, the loss keeps the mask of a left-padded batch, which attention needs."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16))
    masked: list[bool] = []
    model.lm.register_forward_pre_hook(
        lambda module, args, kwargs: masked.append(kwargs.get("attention_mask") is not None), with_kwargs=True
    )

    def loss(left: bool, drop: bool | None) -> bool:
        ids, mask = pad_batch(ROWS, left=left)
        model.loss(
            input_ids=ids,
            attention_mask=mask,
            labels=ids.masked_fill(mask == 0, -100),
            length_groups=1,
            drop_right_padding_mask=drop,
        )
        return masked[-1]

    assert loss(left=False, drop=None) and loss(left=False, drop=False)
    assert not loss(left=False, drop=True)
    assert loss(left=True, drop=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_static_cache_prefill_sees_no_empty_slots(kind: str) -> None:
    """A static cache's prefill reaches attention without a mask and with the cache's unfilled slots among the
    keys (transformers relies on SDPA's top-left causal pattern there): with the prefix in front those slots
    must stay hidden, so the logits and the generated scores are those of the dynamic cache."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids = ROWS[0][None]
    settings = dict(max_new_tokens=3, pad_token_id=PAD, eos_token_id=None, output_scores=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        cache = StaticCache(config=model.lm.config, max_cache_len=32)
        got = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        dynamic = model.generate(input_ids=ids, return_dict_in_generate=True, **settings).scores
        static = model.generate(
            input_ids=ids, cache_implementation="static", return_dict_in_generate=True, **settings
        ).scores
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for step, want in zip(static, dynamic, strict=True):
        torch.testing.assert_close(step, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["t5", "umt5"])
def test_t5_decodes_with_a_static_cache_as_with_the_dynamic_one(family: str) -> None:
    """A static cache holds keys for the tokens yet to come: the prefix's relative bias counts a query's position
    from the tokens already in the cache, not from the cache's size."""
    model = PrefixModel(tiny_lm(family), PrefixConfig(length=3, hidden_dim=16)).eval()
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, output_scores=True)
    with torch.no_grad():
        dynamic = model.generate(input_ids=ROWS[0][None], return_dict_in_generate=True, **settings).scores
        static = model.generate(
            input_ids=ROWS[0][None], cache_implementation="static", return_dict_in_generate=True, **settings
        ).scores
    for step, want in zip(static, dynamic, strict=True):
        torch.testing.assert_close(step, want, atol=1e-5, rtol=0)


def test_t5_cached_decoding_gives_the_logits_of_its_whole_decoder_input() -> None:
    """Each decoding step's prefix bias counts the query's position after the tokens in the decoder's cache (there
    is no decoder mask to count over): the steps' logits are those of the generated sequence run at once."""
    model = PrefixModel(tiny_lm("t5"), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids, mask = pad_batch(ROWS, left=False)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **settings
        )
        whole = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, whole[:, step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_encoder_decoder_loss_of_a_bf16_lm_is_float32(kind: str) -> None:
    """An encoder-decoder stored in bf16 computes its own loss in bf16 (steps of about 0.03 near 4); the loss is
    the float32 cross-entropy of its logits, as causal LMs' is, taken once: the LM is not given the labels."""
    model = PrefixModel(tiny_lm(kind).to(torch.bfloat16), PrefixConfig(length=3, hidden_dim=16)).eval()
    batch = training_batch(encoder_decoder=True)
    given = []
    hook = model.lm.register_forward_pre_hook(lambda _, args, kwargs: given.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        loss = model.loss(**batch)
    hook.remove()
    assert "labels" not in given[0] and "decoder_input_ids" in given[0]
    with torch.no_grad():
        logits = model(**batch).logits.float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("given", ["decoder_input_ids", "decoder_inputs_embeds"])
def test_encoder_decoder_loss_reads_the_decoder_inputs_it_is_given(given: str) -> None:
    """Only labels without decoder inputs are shifted right into them: given ids or embeddings are the decoder's."""
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=3, hidden_dim=16)).eval()
    batch = training_batch(encoder_decoder=True)
    decoder_ids = batch["labels"].clamp(min=PAD).flip(1)  # not the labels shifted right
    decoder = decoder_ids if given == "decoder_input_ids" else model.lm.get_input_embeddings()(decoder_ids)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], given: decoder}
    with torch.no_grad():
        loss = model.loss(labels=batch["labels"], **inputs)
        logits = model(**inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart", "t5", "umt5"])
def test_training_step_moves_only_the_prefix(kind: str) -> None:
    """Invariant 2: no gradient reaches the LM, its weights stay bit-identical, the prefix's change."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16, dropout=0.1))
    lm_before = copy.deepcopy(model.lm.state_dict())
    prefix_before = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    model.train()
    assert not model.lm.training and all(not m.training for m in model.lm.modules())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids, mask = pad_batch(ROWS, left=False)
    for _ in range(2):
        extra = {"decoder_input_ids": ids} if model.lm.config.is_encoder_decoder else {}
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, **extra).loss
        loss.backward()
        assert all(p.grad is None for p in model.lm.parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(lm_before[k], v) for k, v in model.lm.state_dict().items())
    assert all(not torch.equal(prefix_before[k], v) for k, v in model.encoders.state_dict().items())
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"encoders"}


@pytest.mark.parametrize("wrapper", [PrefixModel, PrefixBank])
def test_an_lm_given_in_training_mode_is_held_frozen_in_eval_mode(wrapper: type) -> None:
    """The LM's dropout stays off from the start, before any train() or eval() of the wrapper."""
    lm = tiny_lm("gpt2").train()
    model = wrapper(lm) if wrapper is PrefixBank else wrapper(lm, PrefixConfig(length=2))
    assert not any(module.training for module in model.lm.modules())
    assert not any(parameter.requires_grad for parameter in model.lm.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_step_on_the_cache_without_mask_continues_the_positions(kind: str) -> None:
    """A caller's own decoding loop (no mask, no position ids): the next token's positions continue after the
    cached tokens, and its logits are those of the whole sequence run at once."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).eval()
    row = ROWS[0][None]
    with torch.no_grad():
        prompt = model(input_ids=row, use_cache=True)
        token = prompt.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, cache=prompt.cache).logits[0, -1]
        whole = model(input_ids=torch.cat([row, token], dim=1)).logits[0, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_step_on_the_cache_with_a_mask_continues_each_rows_positions(kind: str) -> None:
    """A caller's own decoding loop over a left-padded batch (a mask of the cached and new tokens, no position
    ids): each row's new token takes the position after its own real tokens, its logits those of the whole row."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        prompt = model(input_ids=ids, attention_mask=mask, use_cache=True)
        token = prompt.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=mask, cache=prompt.cache).logits[:, -1]
        whole = model(input_ids=torch.cat([ids, token], dim=1), attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)


def _greedy_without_cache(model: PrefixModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_matches_stepwise_argmax_and_batching(kind: str) -> None:
    """Invariant 3: cached greedy generate = uncached argmax loop; left-padded batch = one by one."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3)).eval()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        singles = [model.generate(input_ids=row[None], **settings)[0] for row in ROWS]
        for row, single in zip(ROWS, singles, strict=True):
            torch.testing.assert_close(single, _greedy_without_cache(model, row[None], 6)[0])
        ids, mask = pad_batch(ROWS, left=True)
        batched = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for i, (row, single) in enumerate(zip(ROWS, singles, strict=True)):
        assert torch.equal(batched[i, ids.shape[1] - len(row) :], single)
    scored = dict(settings, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        prefixed = model.generate(input_ids=ROWS[0][None], **scored).scores[0]
        with model.prefix_disabled():
            plain = model.lm.generate(input_ids=ROWS[0][None], **scored).scores[0]
    assert not torch.allclose(plain, prefixed, atol=1e-3), "generation must use the prefix"


@pytest.mark.parametrize("kind", ["bart", "t5", "umt5"])
def test_encoder_decoder_generation_batched_equals_one_by_one(kind: str) -> None:
    """Greedy and beam search over a right-padded batch give each input's own result."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3)).eval()
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None)
    beams = dict(settings, num_beams=3, num_return_sequences=3)
    ids, mask = pad_batch(ROWS, left=False)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **settings)
        batched_beams = model.generate(input_ids=ids, attention_mask=mask, **beams)
        for i, row in enumerate(ROWS):
            assert torch.equal(batched[i], model.generate(input_ids=row[None], **settings)[0])
            assert torch.equal(batched_beams[3 * i : 3 * i + 3], model.generate(input_ids=row[None], **beams))
        with model.prefix_disabled():
            plain = model.lm.generate(input_ids=ids, attention_mask=mask, **beams)
    assert batched_beams.shape == (9, 6)
    assert not torch.equal(plain, batched_beams), "generation must use the prefix"


def test_beam_search_shares_the_prefix_across_beams() -> None:
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3)).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad(), record_attention_calls() as calls:
        out = model.generate(
            input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None
        )
    assert out.shape == (3, ids.shape[1] + 4)
    prompt_calls = len(model.sites)  # the prompt runs once per input, then every step once per beam
    assert [call.key.shape[0] for call in calls] == [3] * prompt_calls + [12] * (len(calls) - prompt_calls)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["embedding", "infix"])
def test_gradient_checkpointing_keeps_the_gradients_of_every_prefix_kind(kind: str, family: str) -> None:
    """An embedding-only prefix trains through the LM's own pass over it, which is not recomputed (it would run
    again with the prefix switched back on)."""
    model = PrefixModel(tiny_lm(family), PrefixConfig(length=3, kind=kind, hidden_dim=16)).train()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [parameter.grad.clone() for parameter in model.trainable_parameters()]

    plain = gradients()
    model.enable_gradient_checkpointing()
    for checkpointed, expected in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(checkpointed, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart", "t5"])
def test_gradient_checkpointing_recomputes_with_the_prefix(kind: str) -> None:
    """Invariant 5: same gradients, and the layers really run twice (in the forward as the README calls it: the
    LM's default ``use_cache=True`` would have each recomputed layer add to the cache again)."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).train()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert_checkpointing_keeps_gradients(model, lambda: model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart", "t5"])
def test_export_then_load_gives_the_same_logits(kind: str, tmp_path) -> None:
    """Invariant 4: only the materialized prefix is saved; loading reproduces the trained model."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, hidden_dim=16)).eval()
    model.save(tmp_path)
    tensors = load_file(tmp_path / "prefix.safetensors")
    materialized = {f"{g}.{i}": block for g, e in model.encoders.items() for i, block in enumerate(e())}
    assert tensors.keys() == materialized.keys()
    for name, block in materialized.items():
        torch.testing.assert_close(tensors[name], block.detach())
    site = model.sites[0]
    expected_bytes = 3 * len(model.sites) * 2 * site.kv_heads * site.head_dim * 4
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected_bytes
    description = json.loads((tmp_path / "prefix_config.json").read_text())
    assert description["base_model"]["model_type"] == kind and description["prefix"]["length"] == 3

    loaded = PrefixModel.from_prefix(tiny_lm(kind), tmp_path).eval()
    assert loaded.config.reparam == "none"
    encoder_decoder = model.lm.config.is_encoder_decoder
    ids, mask = pad_batch(ROWS, left=not encoder_decoder)
    extra = {"decoder_input_ids": ids} if encoder_decoder else {}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, **extra).logits,
            model(input_ids=ids, attention_mask=mask, **extra).logits,
        )


def test_wrapped_layers_still_export_and_decode(tmp_path) -> None:
    """FSDP and activation checkpointing wrap each decoder layer, which inserts a segment into the names of the
    modules inside: the export and the cached prefix of decoding still find every attention module."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16)).eval()
    ids, mask = pad_batch(ROWS, left=True)
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    expected = model.generate(**options)
    layers = model.lm.model.layers
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer)
    assert "_checkpoint_wrapped_module" in next(name for name, _ in model.lm.named_modules() if "self_attn" in name)
    torch.testing.assert_close(model.generate(**options), expected, rtol=0, atol=0)
    model.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()  # PEFT's layout orders the sites by layer


def test_saving_into_a_used_folder_leaves_no_files_of_the_earlier_prefix(tmp_path) -> None:
    PrefixModel(tiny_lm("llama"), PrefixConfig(length=3)).save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()  # PEFT's files beside ours
    PrefixModel(tiny_lm("llama"), PrefixConfig(length=5, shift_positions=False)).save(tmp_path)  # PEFT can't hold it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prefix.safetensors", "prefix_config.json"]
    PrefixModel(tiny_lm("llama"), PrefixConfig(length=4)).save(tmp_path, format="peft")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert PrefixModel.from_peft(tiny_lm("llama"), tmp_path).config.length == 4


def test_saving_onto_a_file_is_refused_naming_it(tmp_path) -> None:
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=2, hidden_dim=8))
    taken = tmp_path / "prefix.safetensors"
    taken.write_text("")
    for kind in (None, "peft"):
        with pytest.raises(NotADirectoryError, match="prefix.safetensors is a file: a prefix is saved into a folder"):
            model.save(taken, format=kind)


def test_older_stacked_export_still_loads(tmp_path) -> None:
    """Format prefix-lightning/1 (one stacked tensor per group, shapes per group) loads to the same logits."""
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=3, hidden_dim=16)).eval()
    model.save(tmp_path)
    description = json.loads((tmp_path / "prefix_config.json").read_text())
    with torch.no_grad():
        stacked = {group: torch.stack(encoder()).contiguous() for group, encoder in model.encoders.items()}
    save_file(stacked, tmp_path / "prefix.safetensors")
    site = model.sites[0]
    groups = {g: {"layers": len(b), "kv_heads": site.kv_heads, "head_dim": site.head_dim} for g, b in stacked.items()}
    description.update({"format": "prefix-lightning/1", "sites": groups})
    (tmp_path / "prefix_config.json").write_text(json.dumps(description))

    loaded = PrefixModel.from_prefix(tiny_lm("bart"), tmp_path).eval()
    ids, mask = pad_batch(ROWS, left=False)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits,
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits,
        )


def test_older_embedding_only_export_still_loads(tmp_path) -> None:
    """Format prefix-lightning/1 stacked the attention sites' blocks per group but kept embedding-only's input
    embeddings as one (L, d_model) block."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3, kind="embedding", reparam="none")).eval()
    model.save(tmp_path)
    description = json.loads((tmp_path / "prefix_config.json").read_text())
    save_file({"input": model.prefix_encoders["input"]()[0].detach().contiguous()}, tmp_path / "prefix.safetensors")
    site = model.sites[0]
    groups = {"self": {"layers": len(model.sites), "kv_heads": site.kv_heads, "head_dim": site.head_dim}}
    description.update({"format": "prefix-lightning/1", "sites": groups})
    (tmp_path / "prefix_config.json").write_text(json.dumps(description))

    loaded = PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ROWS[0][None]).logits, model(input_ids=ROWS[0][None]).logits)


def test_a_folder_that_holds_the_export_in_a_folder_of_its_own_names_it(tmp_path) -> None:
    """``from_prefix(lm, <run>)`` for ``<run>/prefix`` (the commands take a run's folder; the library its export)."""
    PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(tmp_path / "prefix")
    with pytest.raises(FileNotFoundError, match=r"json is missing \(the folders inside it that hold one:"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)


def test_prefix_refuses_a_base_model_of_another_shape(tmp_path) -> None:
    PrefixModel(tiny_lm("llama"), PrefixConfig(length=3)).save(tmp_path)
    with pytest.raises(ValueError, match="trained for .*llama.* this base model \\(gpt2\\)"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)


def test_prefix_refuses_a_base_model_of_another_type_and_the_same_shape(tmp_path) -> None:
    """Same shapes, other computations: a prefix for Qwen2 is refused on a Llama as PrefixBank.add refuses it."""
    PrefixModel(tiny_lm("llama"), PrefixConfig(length=3)).save(tmp_path)
    description = json.loads((tmp_path / "prefix_config.json").read_text())
    description["base_model"]["model_type"] = "qwen2"
    (tmp_path / "prefix_config.json").write_text(json.dumps(description))
    with pytest.raises(
        ValueError, match="trained for a model \\(qwen2\\); this base model is a llama model of the same shape"
    ):
        PrefixModel.from_prefix(tiny_lm("llama"), tmp_path)
    description["base_model"] = {}  # an export that names no base model is checked by its shapes alone
    (tmp_path / "prefix_config.json").write_text(json.dumps(description))
    PrefixModel.from_prefix(tiny_lm("llama"), tmp_path)
    with pytest.raises(ValueError, match="trained for a model with .* does not fit"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)


def test_corrupted_export_is_refused(tmp_path) -> None:
    PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(tmp_path)
    weights = tmp_path / "prefix.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)


def test_an_export_whose_tensors_differ_from_its_description_is_refused_naming_the_site(tmp_path) -> None:
    PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(tmp_path)
    weights = tmp_path / "prefix.safetensors"
    tensors = load_file(weights)
    tensors["self.1"] = tensors["self.1"][:, :, :2].contiguous()  # 2 virtual tokens where the description says 3
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="the self prefix of site 1 should be \\(2, 4, 3, 8\\), got \\(2, 4, 2, 8\\)"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path)


def _truncated(folder: Path, weights: str) -> None:
    (folder / weights).write_bytes((folder / weights).read_bytes()[:-10])


@pytest.mark.parametrize("loader", ["from_prefix", "from_peft", "MultiTaskPrefix.from_export"])
def test_a_refused_export_leaves_the_lm_as_it_was(loader: str, tmp_path: Path) -> None:
    """The export is checked before the LM is wrapped: a refusal changes none of its outputs (GPT-2's positions
    were shifted) and a good export still loads onto it."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    if loader == "MultiTaskPrefix.from_export":
        load, message = MultiTaskPrefix.from_export, "truncated or corrupted"
        MultiTaskPrefix(tiny_lm("gpt2"), ["a", "b"], PrefixConfig(length=3)).save(good)
        shutil.copytree(good, bad)
        _truncated(bad / "b", "prefix.safetensors")
    elif loader == "from_peft":
        load, message = PrefixModel.from_peft, "is for 3 layers of key/value width 16 in 2 heads, but this model has 2"
        PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(good, format="peft")
        PrefixModel(tiny_lm("llama"), PrefixConfig(length=3)).save(bad, format="peft")
    else:
        load, message = PrefixModel.from_prefix, "truncated or corrupted"
        PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3)).save(good)
        shutil.copytree(good, bad)
        _truncated(bad, "prefix.safetensors")
    lm = tiny_lm("gpt2")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    with pytest.raises(ValueError, match=message):
        load(lm, bad)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, before)
    assert all(parameter.requires_grad for parameter in lm.parameters())
    load(lm, good)


@pytest.mark.parametrize("family", ["t5", "umt5"])
@pytest.mark.parametrize("shift", [True, False])
def test_t5_left_padded_rows_give_each_rows_logits_alone(shift: bool, family: str) -> None:
    """The prefix's relative bias counts a query's distance from its row's first real token, not from the padded
    row's first column: each left-padded row's logits (encoder and decoder inputs) are the row's alone."""
    model = PrefixModel(tiny_lm(family), PrefixConfig(length=3, reparam="none", shift_positions=shift)).eval()
    model.init_prefix_from_tokens(WORDS)
    ids, mask = pad_batch(ROWS, left=True)
    targets, target_mask = pad_batch(list(reversed(ROWS)), left=True)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask
        ).logits
        for i, (row, target) in enumerate(zip(ROWS, reversed(ROWS), strict=True)):
            alone = model(input_ids=row[None], decoder_input_ids=target[None]).logits[0]
            torch.testing.assert_close(logits[i][target_mask[i].bool()], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["t5", "umt5"])
def test_t5_decodes_left_padded_inputs_as_right_padded_ones(family: str) -> None:
    """A prefix's relative bias counts each row's positions from its first real token, and T5's own biases, between
    real tokens, do not depend on the padding: left-padded encoder inputs decode as right-padded ones."""
    model = PrefixModel(tiny_lm(family), PrefixConfig(length=3, reparam="none")).eval()
    model.init_prefix_from_tokens(WORDS)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    settings |= {"output_logits": True, "return_dict_in_generate": True}
    outputs = []
    for left in (True, False):
        ids, mask = pad_batch(ROWS, left)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, **settings))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for left_padded, right_padded in zip(outputs[0].logits, outputs[1].logits, strict=True):
        torch.testing.assert_close(left_padded, right_padded, atol=1e-5, rtol=0)


def test_the_reparametrization_is_linear_tanh_linear_over_a_smaller_table() -> None:
    """P = Linear(d, k) - tanh - Linear(k, layers * 2 * d_kv) applied to P' (L x d), the paper's MLP (without its
    tanh it collapses to one linear map of P', and every other test still passed)."""
    lm = tiny_lm("llama")
    model = PrefixModel(lm, PrefixConfig(length=3, hidden_dim=16))
    encoder = model.prefix_encoders["self"]
    weights = {name: parameter.detach() for name, parameter in encoder.named_parameters()}
    embedding = weights["embedding"]
    assert embedding.shape == (3, lm.config.hidden_size)
    hidden = torch.tanh(embedding @ weights["mlp.0.weight"].T + weights["mlp.0.bias"])
    expected = hidden @ weights["mlp.2.weight"].T + weights["mlp.2.bias"]
    config = lm.config
    width = config.num_hidden_layers * 2 * config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert hidden.shape == (3, 16) and expected.shape == (3, width)
    torch.testing.assert_close(encoder.flat().detach(), expected)


def test_prefix_key_values_are_each_sites_keys_then_values() -> None:
    """prefix_key_values() gives per attention module (keys, values), the order PEFT and set_prefix_key_values take:
    for a prefix from words, the plain LM's own keys and values of those words."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    ids = ROWS[0][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.prefix_disabled(), record_attention_calls() as calls:
            model.lm(input_ids=WORDS[None], use_cache=False)
    names = {module: name for name, module in model.lm.named_modules()}
    plain = {names[call.module]: (call.key[0], call.value[0]) for call in calls}
    pairs = model.prefix_key_values()
    assert list(pairs) == list(plain)
    for name, (keys, values) in pairs.items():
        torch.testing.assert_close(keys, plain[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(values, plain[name][1], atol=1e-6, rtol=0)
    model.set_prefix_key_values(pairs)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=0, rtol=0)


def test_real_word_init_with_mlp_fits_the_target() -> None:
    direct = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=4, reparam="none"))
    direct.init_prefix_from_tokens(WORDS)
    mlp = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=4, hidden_dim=64))
    mlp.init_prefix_from_tokens(WORDS)
    for name, (key, value) in direct.prefix_key_values().items():
        fitted_key, fitted_value = mlp.prefix_key_values()[name]
        scale = key.abs().max()
        assert (fitted_key - key).abs().max() < 0.05 * scale
        assert (fitted_value - value).abs().max() < 0.05 * value.abs().max()


def test_short_init_words_are_repeated_to_the_prefix_length() -> None:
    """[5, 6] for a prefix of 4 is [5, 6, 5, 6] (not [5, 5, 6, 6]), and [5, 6, 7, 8, 9] is cut to [5, 6, 7, 8]."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=4, reparam="none"))
    model.init_prefix_from_tokens([5, 6])
    key = next(iter(model.prefix_key_values().values()))[0]
    assert key.shape[1] == 4 and not torch.allclose(key[:, 0], key[:, 1])
    for given, meant in (([5, 6], [5, 6, 5, 6]), ([5, 6, 7, 8, 9], [5, 6, 7, 8])):
        model.init_prefix_from_tokens(given)
        expected = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=4, reparam="none"))
        expected.init_prefix_from_tokens(meant)
        for name, (got_key, got_value) in model.prefix_key_values().items():
            torch.testing.assert_close(got_key, expected.prefix_key_values()[name][0], atol=0, rtol=0)
            torch.testing.assert_close(got_value, expected.prefix_key_values()[name][1], atol=0, rtol=0)


def test_prefix_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="prefix.length"):
        PrefixConfig(length=0)
    with pytest.raises(ValueError, match="prefix.hidden_dim"):
        PrefixConfig(hidden_dim=-1)
    with pytest.raises(ValueError, match="prefix.reparam"):
        PrefixConfig(reparam="lstm")
    with pytest.raises(ValueError, match="prefix.shift_positions must be true or false, got 'false'"):
        PrefixConfig(shift_positions="false")  # a non-empty string would count as true
    with pytest.raises(ValueError, match="prefix.init_vocab must be true or false"):
        PrefixConfig(init_vocab="no")
    with pytest.raises(ValueError, match="prefix.length must be a positive integer, got True"):
        PrefixConfig(length=True)
    with pytest.raises(ValueError, match="prefix.dropout"):
        PrefixConfig(dropout="0.1")


def test_arguments_of_the_wrong_kind_are_refused_by_name() -> None:
    lm = tiny_lm("gpt2")
    with pytest.raises(TypeError, match="not 10; give the fields by name"):
        PrefixModel(lm, 10)
    for wrong in ("gpt2", torch.nn.Linear(3, 3)):
        with pytest.raises(TypeError, match="a prefix wraps a transformers model"):
            PrefixModel(wrong, length=2)
        with pytest.raises(TypeError, match="a prefix wraps a transformers model"):
            PrefixBank(wrong)
    model = PrefixModel(lm, length=2)
    for ids in (torch.tensor([1, 2, 3]), [[1, 2, 3]]):
        with pytest.raises(ValueError, match="input_ids must be a tensor of \\(batch, tokens\\)"):
            model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"token ids must be in 0..{VOCAB - 1}, got \\[{VOCAB}\\]"):
        model.init_prefix_from_tokens([VOCAB])
    with pytest.raises(ValueError, match="sets a direct prefix \\(reparam='none'\\)"):
        model.set_prefix_key_values(model.prefix_key_values())
    positions = lm.config.max_position_embeddings
    lm = tiny_lm("gpt2")
    with pytest.raises(ValueError, match=f"leaves no position for the real tokens: .* has {positions} positions"):
        PrefixModel(lm, length=positions)
    PrefixModel(lm, length=positions, shift_positions=False)  # the real tokens keep their positions


def test_wrapping_a_model_twice_is_refused() -> None:
    lm = tiny_lm("gpt2")
    PrefixModel(lm, PrefixConfig(length=2))
    with pytest.raises(ValueError, match="only once"):
        PrefixModel(lm, PrefixConfig(length=2))


def test_model_without_attention_is_unsupported() -> None:
    config = AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM has no attention layers.*Supported: .*GPT-2"):
        PrefixModel(AutoModelForCausalLM.from_config(config), PrefixConfig(length=2))


def test_inputs_past_the_positions_behind_the_prefix_are_refused_naming_their_length() -> None:
    """Real tokens start at position L: a forward, loss or generate whose tokens would pass the position table
    (GPT-2's 64 here) is refused with the length, the limit and the L virtual positions, not the position
    embedding's IndexError (a device-side assert on CUDA); left padding takes no positions."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=10, hidden_dim=8))
    fits = torch.randint(3, VOCAB, (1, 54))
    model(input_ids=fits)
    too_long = torch.randint(3, VOCAB, (1, 55))
    refusal = "input row 0 needs 55 positions, but GPT2LMHeadModel's 64 positions hold only 54 behind the prefix's 10"
    with pytest.raises(ValueError, match=refusal):
        model(input_ids=too_long)
    with pytest.raises(ValueError, match=refusal):
        model.loss(labels=too_long, input_ids=too_long)
    model.generate(fits[:, :50], max_new_tokens=5, min_new_tokens=5)  # the last new token is not read back
    with pytest.raises(ValueError, match="needs 55 positions \\(50 given, up to 6 generated\\).*or generate fewer"):
        model.generate(fits[:, :50], max_new_tokens=6)
    ids, mask = pad_batch([fits[0], fits[0, :3]], left=True)
    padded_ids, padded_mask = torch.nn.functional.pad(ids, (6, 0), value=PAD), torch.nn.functional.pad(mask, (6, 0))
    model(input_ids=padded_ids, attention_mask=padded_mask)  # 60 columns, at most 54 real tokens
    with pytest.raises(ValueError, match=refusal):  # a 4-D mask counts no positions: the row's columns do
        model(input_ids=too_long, attention_mask=torch.ones(1, 1, 55, 65))
    with torch.no_grad(), model.prefix_disabled():
        model(input_ids=too_long)  # the plain LM's positions


def test_an_infix_counts_its_virtual_positions_only_where_tokens_stand_after_it() -> None:
    """[x; INFIX; y]: a forward without labels is all source, which takes positions 0..n-1 (the whole table); the
    target of a loss and the generated tokens stand L positions later."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=10, hidden_dim=8, kind="infix"))
    whole_table = torch.randint(3, VOCAB, (1, 64))
    model(input_ids=whole_table)
    with pytest.raises(ValueError, match="needs 65 positions, but GPT2LMHeadModel's 64 positions hold only 64: "):
        model(input_ids=torch.cat([whole_table, whole_table[:, :1]], 1))
    labels = whole_table.clone()
    labels[:, :60] = IGNORE_INDEX
    with pytest.raises(ValueError, match="needs 64 positions, but .* hold only 54 behind the prefix's 10"):
        model.loss(labels=labels, input_ids=whole_table)
    with pytest.raises(ValueError, match="needs 64 positions, but .* hold only 54 behind the prefix's 10"):
        model(input_ids=whole_table, labels=labels)
    with pytest.raises(ValueError, match="needs 55 positions \\(50 given, up to 6 generated\\)"):
        model.generate(whole_table[:, :50], max_new_tokens=6)


def test_encoder_decoder_inputs_past_the_positions_behind_the_prefix_are_refused() -> None:
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=10, hidden_dim=8))
    ids = torch.randint(3, VOCAB, (2, 55))
    with pytest.raises(ValueError, match="encoder input row 0 needs 55 positions, but .* hold only 54"):
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
    with pytest.raises(ValueError, match="decoder input row 0 needs 55 positions"):
        model.loss(labels=ids, input_ids=ids[:, :3])
    model.generate(ids[:, :3], max_new_tokens=54, min_new_tokens=54)
    with pytest.raises(ValueError, match="decoder input row 0 needs 55 positions \\(1 given, up to 55 generated\\)"):
        model.generate(ids[:, :3], max_new_tokens=55)


def test_inputs_of_the_wrong_shape_type_vocabulary_or_device_are_refused_by_name() -> None:
    """The LM failed on them deep inside (a size mismatch, an IndexError: a device-side assert on CUDA), or took a
    mask of the wrong size without a word (broadcast over the rows, or positions counted from its extra columns)."""
    model = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=2, hidden_dim=8))
    ids, mask = pad_batch(ROWS, left=True)
    foreign = ids.clone()
    foreign[1, -1] = VOCAB
    cases = [
        (dict(input_ids=ids[0]), r"input_ids must be a tensor of \(batch, tokens\), .* got \(5,\)"),
        (dict(input_ids=ids.float()), "input_ids must be integer token ids, got torch.float32"),
        (dict(input_ids=ids.bool()), "input_ids must be integer token ids, got torch.bool"),
        (dict(input_ids=foreign), rf"token id {VOCAB}, outside the vocabulary of GPT2LMHeadModel \(0..{VOCAB - 1}\)"),
        (dict(input_ids=ids - VOCAB), "token id -"),
        (dict(input_ids=ids, attention_mask=mask[:1]), r"attention_mask is \(1, 5\), the inputs \(3, 5\)"),
        (dict(input_ids=ids, attention_mask=torch.nn.functional.pad(mask, (2, 0), value=1)), r"is \(3, 7\)"),
        (dict(input_ids=ids, attention_mask=mask.to("meta")), "attention_mask is on meta, the inputs on cpu"),
    ]
    for inputs, refusal in cases:
        with pytest.raises(ValueError, match=refusal):
            model(**inputs)
        with pytest.raises(ValueError, match=refusal):
            model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"labels are \(1, 5\), the inputs \(3, 5\): a decoder-only LM takes one"):
        model.loss(labels=ids[:1], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"labels are \(3, 4\), the inputs \(3, 5\)"):
        model.loss(labels=ids[:, :4], input_ids=ids, attention_mask=mask)
    check_inputs(model.lm, {"input_ids": foreign.to("meta")})  # ids off the CPU are not read back for the vocabulary
    with pytest.raises(ValueError, match="You have to specify either input_ids or inputs_embeds"):
        model()  # the LM's own words (our position hook failed on the missing inputs with a KeyError)
    assert model.generate(max_new_tokens=2).shape == (1, 3)  # from the start token


def test_encoder_decoder_inputs_for_other_rows_are_refused_by_name() -> None:
    """Labels for fewer rows than the encoder's failed in a matrix product deep inside the LM; a decoder mask of
    another size was taken without a word."""
    model = PrefixModel(tiny_lm("bart"), PrefixConfig(length=2, hidden_dim=8))
    ids, mask = pad_batch(ROWS, left=False)
    with pytest.raises(ValueError, match="labels: 1 rows for 3 input rows; give one per input row"):
        model.loss(labels=ids[:1], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"decoder_attention_mask is \(3, 4\), the decoder_input_ids \(3, 5\)"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=mask[:, :4])
