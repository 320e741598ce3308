"""Invariant 7 (docs/design.md): every supported model family passes real-word equivalence, in one matrix of tiny random
models; the families that cannot carry a prefix are refused with a message that says why and what works.

Decoder-only LMs: a prefix set from words w gives the plain LM's logits on [w; x] at x's positions (invariant 1).
Encoder-decoders (BART, T5) follow the documented rule, exactly: a prefix from w (encoder w, decoder w, and the
cross-attention keys/values of the encoded w) gives the plain model's logits on encoder input [w; x] and decoder
input [w; y] at y's positions, where w's rows see only w (the prefix was computed from w alone), in the encoder
and in cross-attention. T5's relative position bias treats the prefix as the L positions before the input
(prefix_lightning/prefix/relative_bias.py): the rule holds only if that extension is right.
"""

from __future__ import annotations

import pytest
import torch

from prefix_lightning import PrefixConfig, PrefixModel, UnsupportedModelError
from tests.helpers.families import DECODERS, ENCODER_DECODERS, GQA, check_decoding
from tests.helpers.tiny import ROWS, WORDS, pad_batch, tiny_lm

TARGET = torch.tensor([40, 41, 42])


def prefixed_from_words(model_type: str, fields: dict) -> PrefixModel:
    model = PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    return model


@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_only_real_word_equivalence(family: str, left: bool) -> None:
    model_type, fields = DECODERS[family]
    reference = tiny_lm(model_type, **fields)
    model = prefixed_from_words(model_type, fields)
    ids, mask = pad_batch(ROWS, left)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(ROWS):
            expected = reference(input_ids=torch.cat([WORDS, row])[None]).logits[0, len(WORDS) :]
            torch.testing.assert_close(logits[i][mask[i].bool()], expected, atol=1e-4, rtol=0)


def test_per_layer_head_sizes_keep_their_own_shapes() -> None:
    """Each site's prefix has its layer's key/value heads and head size (the model's layers differ)."""
    model_type, fields = DECODERS["gemma4_per_layer_heads"]
    model = PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=10))
    shapes = [(site.kv_heads, site.head_dim) for site in model.sites]
    assert shapes == [(2, 8), (1, 16)]
    keys = [key.shape for key, _ in model.prefix_key_values().values()]
    assert keys == [(2, 10, 8), (1, 10, 16)]


def test_per_layer_head_sizes_export_and_refusal(tmp_path) -> None:
    """The export holds each site's own shape, reloads to the same logits, and is refused, naming the site, by a
    model whose layer differs."""
    model_type, fields = DECODERS["gemma4_per_layer_heads"]
    model = PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=3, hidden_dim=16)).eval()
    model.save(tmp_path)
    loaded = PrefixModel.from_prefix(tiny_lm(model_type, **fields), tmp_path).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    other = tiny_lm(model_type, **{**fields, "global_head_dim": 32})
    with pytest.raises(
        ValueError,
        match="self site 1 with 1 key/value heads of size 16, where this base model's \\(model.layers.1.self_at",
    ):
        PrefixModel.from_prefix(other, tmp_path)


def test_per_layer_head_sizes_decode() -> None:
    model_type, fields = DECODERS["gemma4_per_layer_heads"]
    check_decoding(PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=3)).eval(), ROWS, steps=4)


def _encoder_decoder_reference(reference, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain model's logits for decoder input [w; y] over encoder input [w; x], w's rows seeing only w (the
    encoder's and the cross-attention's), at y's positions."""
    words, batch = len(WORDS), ids.shape[0]
    encoder_ids = torch.cat([WORDS.expand(batch, -1), ids], dim=1)
    real = torch.cat([torch.ones(batch, words, dtype=torch.bool), mask.bool()], dim=1)  # (batch, keys)
    is_word = torch.arange(encoder_ids.shape[1]) < words

    def mask_for(queries: int) -> torch.Tensor:  # (batch, 1, queries, keys): w rows see w, others all real keys
        rows = torch.arange(queries)[:, None] < words
        return torch.where(rows[None], is_word[None, None], real[:, None]).unsqueeze(1)

    encoder_mask = mask_for(encoder_ids.shape[1])
    decoder_ids = torch.cat([WORDS, TARGET]).expand(batch, -1)
    encoded = reference.get_encoder()(input_ids=encoder_ids, attention_mask=encoder_mask).last_hidden_state
    output = reference(
        encoder_outputs=(encoded,), attention_mask=mask_for(decoder_ids.shape[1]), decoder_input_ids=decoder_ids
    )
    return output.logits[:, words:]


# The decoder's cross-attention modules of BART and of the T5 family.
CROSS_ATTENTION = ("encoder_attn", "EncDecAttention")


def _attention_kind(name: str) -> str:
    """The site group of an encoder-decoder's attention module, from its name: an export names its blocks by group,
    so decoder self-attention and cross-attention (of one shape in BART and T5) swapped would pass the real-word
    rule, yet an export made before the swap would load its "decoder" blocks into cross-attention."""
    parts = name.split(".")
    if parts[-1] in CROSS_ATTENTION:
        return "cross"
    return "encoder" if "encoder" in parts else "decoder"


@pytest.mark.parametrize("family", sorted(ENCODER_DECODERS))
def test_encoder_decoder_real_word_rule(family: str) -> None:
    model_type, fields = ENCODER_DECODERS[family]
    reference = tiny_lm(model_type, **fields)
    model = prefixed_from_words(model_type, fields)
    assert {site.group for site in model.sites} == {"encoder", "decoder", "cross"}
    assert [site.group for site in model.sites] == [_attention_kind(site.name) for site in model.sites]
    ids, mask = pad_batch(ROWS, left=False)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=TARGET.expand(len(ROWS), -1)).logits
        expected = _encoder_decoder_reference(reference, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


UNSUPPORTED = {
    "falcon": (
        "falcon",
        dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2),
        "FalconForCausalLM computes attention inside its own modules, not through transformers' "
        "AttentionInterface.*Supported: .*Llama",
    ),
    "gemma2": (
        "gemma2",
        dict(GQA, head_dim=8),
        "Gemma2ForCausalLM computes attention only with attn_implementation eager, flex_attention, "
        "flash_attention_2 \\(it soft-caps its attention scores, attn_logit_softcapping=50.0\\).*needs SDPA",
    ),
    "no layers": (
        "gpt2",
        dict(n_layer=0),
        "GPT2LMHeadModel has no layers \\(its config says 0\\): a prefix needs attention",  # not "does not route"
    ),
    "mamba": (
        "mamba",
        dict(num_hidden_layers=1, hidden_size=16, state_size=4),
        "MambaForCausalLM has no attention layers.*method=full.*Supported: .*GPT-2",
    ),
}


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_is_refused_with_what_would_work(family: str) -> None:
    model_type, fields, message = UNSUPPORTED[family]
    with pytest.raises(UnsupportedModelError, match=message):
        PrefixModel(tiny_lm(model_type, **fields), PrefixConfig(length=2))


def test_a_relative_bias_bucketed_in_an_unknown_way_is_refused_at_construction() -> None:
    """A layer whose own bias table is bucketed by a function of another signature than T5's or UMT5's is refused
    when the prefix is built, not called with settings it may not take at the first forward pass."""
    lm = tiny_lm("umt5")
    for module in lm.modules():
        if isinstance(getattr(module, "relative_attention_bias", None), torch.nn.Embedding):
            bucket = module._relative_position_bucket
            module._relative_position_bucket = lambda relative_position, scale=1, bucket=bucket: bucket(
                relative_position
            )
    with pytest.raises(
        UnsupportedModelError,
        match="UMT5Attention buckets the relative positions .*\\(T5's and UMT5's are supported\\)",
    ):
        PrefixModel(lm, PrefixConfig(length=2))
