"""Embedding-only and infix ([x; INFIX; y]) on tiny random models, and the initialization options."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefix_lightning import PrefixConfig, PrefixModel, UnsupportedModelError
from prefix_lightning.methods.loss import IGNORE_INDEX
from tests.helpers.families import DECODERS
from tests.helpers.tiny import PAD, ROWS, WORDS, pad_batch, tiny_lm

TARGETS = [torch.tensor([40, 41, 42]), torch.tensor([50, 51]), torch.tensor([60, 61, 62, 63])]


def _randomize(model: PrefixModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.encoders.parameters():
            parameter.normal_()


def _pairs() -> dict[str, torch.Tensor]:
    """Right-padded source+target rows with the source masked out of the labels, as the collator makes them."""
    rows = [torch.cat([x, y]) for x, y in zip(ROWS, TARGETS, strict=True)]
    ids, mask = pad_batch(rows, left=False)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (x, y) in enumerate(zip(ROWS, TARGETS, strict=True)):
        labels[i, len(x) : len(x) + len(y)] = y
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- embedding-only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("left", [True, False])
def test_embedding_only_equals_prepending_the_embeddings(kind: str, left: bool) -> None:
    reference = tiny_lm(kind)
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=3, kind="embedding", reparam="none"))
    _randomize(model)
    (embeddings,) = [block.detach() for block in model.encoders["input"]()]
    ids, mask = pad_batch(ROWS, left)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            inputs = torch.cat([embeddings, reference.get_input_embeddings()(row)])[None]
            expected = reference(inputs_embeds=inputs).logits[0, len(embeddings) :]
            torch.testing.assert_close(logits[i][mask[i].bool()], expected, atol=1e-4, rtol=0)


def test_embedding_only_trains_nothing_but_the_input_embeddings() -> None:
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind="embedding", reparam="none"))
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoders.input.prefix"}
    (before,) = [block.detach().clone() for block in model.encoders["input"]()]
    assert before.shape == (3, model.lm.get_input_embeddings().embedding_dim)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.loss(**_pairs()).backward()
        optimizer.step()
    assert not torch.equal(before, model.encoders["input"]()[0])
    assert all(torch.equal(lm_before[k], v) for k, v in model.lm.state_dict().items())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_embedding_only_trains_on_a_bf16_lm(kind: str) -> None:
    """model.backbone.dtype=bfloat16: the float32 embeddings enter the bf16 LM in its precision and get gradients."""
    model = PrefixModel(tiny_lm(kind).to(torch.bfloat16), PrefixConfig(length=3, kind="embedding", hidden_dim=16))
    model.train()
    model.loss(**_pairs()).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.trainable_parameters())


@pytest.mark.parametrize("reparam", ["none", "mlp"])
def test_embedding_only_real_word_init_equals_the_words(reparam: str) -> None:
    """Initialized from real words, embedding-only is the plain LM reading those words first."""
    reference = tiny_lm("llama")
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=len(WORDS), kind="embedding", reparam=reparam))
    model.init_prefix_from_tokens(WORDS)
    row = ROWS[0]
    with torch.no_grad():
        logits = model(input_ids=row[None]).logits[0]
        expected = reference(input_ids=torch.cat([WORDS, row])[None]).logits[0, len(WORDS) :]
    torch.testing.assert_close(logits, expected, atol=1e-4 if reparam == "none" else 2e-2, rtol=0)


def test_embedding_only_and_infix_refuse_encoder_decoder_models() -> None:
    for kind in ("embedding", "infix"):
        with pytest.raises(UnsupportedModelError, match="decoder-only"):
            PrefixModel(tiny_lm("bart"), PrefixConfig(length=2, kind=kind))


def test_an_infix_refuses_decoders_whose_position_embeddings_move_every_token() -> None:
    """BART's decoder alone (BartForCausalLM) embeds its positions in one module for the whole sequence, which
    would move the source behind the infix as well."""
    config = tiny_lm("bart").config
    with pytest.raises(UnsupportedModelError, match="BartForCausalLM's position embeddings move all"):
        PrefixModel(AutoModelForCausalLM.from_config(config), PrefixConfig(length=2, kind="infix"))
    PrefixModel(AutoModelForCausalLM.from_config(config), PrefixConfig(length=2, kind="infix", shift_positions=False))
    PrefixModel(AutoModelForCausalLM.from_config(config), PrefixConfig(length=2))


def test_embedding_only_refuses_models_with_per_layer_inputs_of_token_ids() -> None:
    """Gemma 4 computes per-layer inputs from the token ids (transformers raised deep in its forward)."""
    kind, settings = DECODERS["gemma4_per_layer_heads"]
    with pytest.raises(UnsupportedModelError, match="computes per-layer inputs from the token ids"):
        PrefixModel(tiny_lm(kind, **settings), PrefixConfig(length=2, kind="embedding"))
    PrefixModel(tiny_lm(kind, **settings), PrefixConfig(length=2, kind="infix"))  # keys/values: no input embeddings


# -- infix -------------------------------------------------------------------------------------------------
def _positions_seen(model: PrefixModel, **inputs) -> torch.Tensor:
    """The position ids that reach the decoder stack (after the prefix's shift)."""
    seen = []
    hook = model.lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_infix_sits_between_source_and_target() -> None:
    """The source neither reads the infix nor moves; the target reads it and stands L positions later."""
    length = 4
    reference = tiny_lm("llama")
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=length, kind="infix", reparam="none"))
    _randomize(model)
    batch = _pairs()
    with torch.no_grad():
        logits = model(**batch).logits
        positions = _positions_seen(model, **batch)
        plain = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, (x, y) in enumerate(zip(ROWS, TARGETS, strict=True)):
        source, boundary = len(x) - 1, len(x) - 1  # the last source token predicts y's first token
        torch.testing.assert_close(logits[i, :source], plain[i, :source], atol=1e-5, rtol=0)
        assert not torch.allclose(logits[i, boundary : len(x) + len(y)], plain[i, boundary : len(x) + len(y)])
        expected = torch.cat([torch.arange(len(x)), torch.arange(len(x), len(x) + len(y)) + length])
        assert torch.equal(positions[i, : len(x) + len(y)], expected)


def test_infix_loss_reads_the_infix_only_from_the_target_side() -> None:
    """Gradients reach the infix only through the target: with a single target token predicted by the last source
    token, moving the infix moves the loss; the source-only prefix of the row does not."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=2, kind="infix", reparam="none"))
    _randomize(model)
    batch = _pairs()
    loss = model.loss(**batch)
    loss.backward()
    assert model.encoders["self"].prefix.grad.abs().sum() > 0
    # Same loss with one or two length groups: the infix queries follow the rows.
    torch.testing.assert_close(model.loss(**batch, length_groups=1), model.loss(**batch, length_groups=2))
    torch.testing.assert_close(model(**batch).loss, model.loss(**batch), atol=1e-5, rtol=0)


def test_infix_generation_follows_the_training_layout() -> None:
    """Each greedy step's logits equal a full forward in which the last prompt token and the generated tokens
    read the infix; the same forward with the infix read one token earlier differs."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind="infix", reparam="none"))
    _randomize(model)
    ids, mask = pad_batch(ROWS, left=True)
    width = ids.shape[1]
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        for step, logits in enumerate(output.logits):
            sequence = output.sequences[:, : width + step]
            full_mask = torch.cat([mask, torch.ones(len(ROWS), step, dtype=mask.dtype)], dim=1)
            index = torch.arange(sequence.shape[1])[None]
            inputs = {"input_ids": sequence, "attention_mask": full_mask}
            expected = model(**inputs, infix_queries=index >= width - 1).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
            earlier = model(**inputs, infix_queries=index >= width - 2).logits[:, -1]
            assert not torch.allclose(logits, earlier, atol=1e-4)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, pad_token_id=PAD)
    assert beams.shape[0] == len(ROWS)


def test_infix_generation_with_a_static_cache_reads_the_infix_where_the_dynamic_cache_does() -> None:
    """A static cache's keys include its unfilled slots, so attention cannot count the cached tokens from them:
    a left-padded prompt read the infix from its first token on."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind="infix", reparam="none"))
    _randomize(model)
    ids, mask = pad_batch(ROWS, left=True)
    settings = dict(max_new_tokens=3, pad_token_id=PAD, eos_token_id=None, output_scores=True)
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **settings)
        static = model.generate(
            input_ids=ids, attention_mask=mask, cache_implementation="static", return_dict_in_generate=True, **settings
        )
    for got, expected in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_infix_forward_without_a_mask_sees_the_source(family: str) -> None:
    """The target's positions jump by L after the infix; without a mask (and without a cache) transformers read the
    jump as a second sequence packed into the row and hid the source from the target."""
    model = PrefixModel(tiny_lm(family), PrefixConfig(length=3, kind="infix", reparam="none"))
    _randomize(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]] * 2)
    labels = ids.masked_fill(torch.arange(6) < 3, IGNORE_INDEX)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).logits
        for use_cache in (True, False):
            torch.testing.assert_close(model(input_ids=ids, labels=labels, use_cache=use_cache).logits, expected)


def test_infix_generation_is_the_same_whichever_way_the_prompt_comes() -> None:
    """``inputs=`` (generate's positional name) and ``inputs_embeds=`` read the infix from the prompt's last token
    on, as ``input_ids=`` does (they read it at every step as if it were prompt)."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind="infix", reparam="none"))
    _randomize(model)
    ids, mask = pad_batch(ROWS, left=True)
    settings = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    expected = model.generate(input_ids=ids, **settings)
    assert torch.equal(model.generate(inputs=ids, **settings), expected)
    embeds = model.lm.get_input_embeddings()(ids)
    assert torch.equal(model.generate(inputs_embeds=embeds, **settings), expected[:, ids.shape[1] :])


def test_a_forward_after_generate_reads_the_infix_as_before_it() -> None:
    """generate's prompt width is forgotten when it returns: a forward without labels afterwards (all prompt, no
    token reads the infix) gives what it gave before."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind="infix", reparam="none"))
    _randomize(model)
    row = ROWS[0][None]
    with torch.no_grad():
        before = model(input_ids=row).logits
        model.generate(input_ids=ROWS[2][None], max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        torch.testing.assert_close(model(input_ids=row).logits, before, atol=0, rtol=0)


# -- initialization and export -----------------------------------------------------------------------------
def test_vocabulary_init_is_real_token_init_of_drawn_tokens() -> None:
    drawn = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3, reparam="none"))
    drawn.init_prefix_from_vocabulary(torch.Generator().manual_seed(7))
    tokens = torch.randint(
        drawn.lm.get_input_embeddings().num_embeddings, (3,), generator=torch.Generator().manual_seed(7)
    )
    chosen = PrefixModel(tiny_lm("gpt2"), PrefixConfig(length=3, reparam="none"))
    chosen.init_prefix_from_tokens(tokens)
    torch.testing.assert_close(drawn.encoders["self"](), chosen.encoders["self"]())


@pytest.mark.parametrize("kind", ["embedding", "infix"])
def test_export_then_load_keeps_the_kind(kind: str, tmp_path) -> None:
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, kind=kind, hidden_dim=16))
    _randomize(model)
    batch = _pairs()
    model.save(tmp_path)
    loaded = PrefixModel.from_prefix(tiny_lm("llama"), tmp_path)
    assert loaded.config.kind == kind
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
