"""DESIGN.md invariant 7: every supported model family passes real-word equivalence, in one matrix of tiny random
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from prefix_lightning import PrefixConfig, PrefixModel, UnsupportedModelError

VOCAB, PAD = 100, 1
WORDS = torch.tensor([5, 6, 7, 8])
ROWS = [torch.tensor([10, 11, 12, 13, 14]), torch.tensor([20, 21]), torch.tensor([30, 31, 32])]
TARGET = torch.tensor([40, 41, 42])
LAYERS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
GQA = dict(LAYERS, num_key_value_heads=2)

DECODERS = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64)),
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
T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
ENCODER_DECODERS = {
    "bart": (
        "bart",
        dict(
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
    ),
    "t5": ("t5", T5),
    "flan_t5_gated": ("t5", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def tiny_model(model_type: str, seed: int = 0, **fields):
    """A tiny random model of ``model_type`` with this vocabulary and special ids."""
    ids = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=0, eos_token_id=2, decoder_start_token_id=PAD)
    config = AutoConfig.for_model(model_type, **{**ids, **fields})
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config).eval()


def pad_batch(rows: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def prefixed_from_words(model_type: str, fields: dict) -> PrefixModel:
    model = PrefixModel(tiny_model(model_type, **fields), PrefixConfig(length=len(WORDS), reparam="none"))
    model.init_prefix_from_tokens(WORDS)
    return model


@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_only_real_word_equivalence(family: str, left: bool) -> None:
    model_type, fields = DECODERS[family]
    reference = tiny_model(model_type, **fields)
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
    model = PrefixModel(tiny_model(model_type, **fields), PrefixConfig(length=10))
    shapes = [(site.kv_heads, site.head_dim) for site in model.sites]
    assert shapes == [(2, 8), (1, 16)]
    keys = [key.shape for key, _ in model.prefix_key_values().values()]
    assert keys == [(2, 10, 8), (1, 10, 16)]


def test_per_layer_head_sizes_export_and_refusal(tmp_path) -> None:
    """The export holds each site's own shape, reloads to the same logits, and is refused, naming the site, by a
    model whose layer differs."""
    model_type, fields = DECODERS["gemma4_per_layer_heads"]
    model = PrefixModel(tiny_model(model_type, **fields), PrefixConfig(length=3, hidden_dim=16)).eval()
    model.save(tmp_path)
    loaded = PrefixModel.from_prefix(tiny_model(model_type, **fields), tmp_path).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    other = tiny_model(model_type, **{**fields, "global_head_dim": 32})
    with pytest.raises(
        ValueError, match="self site 1 \\(model.layers.1.self_attn\\) with 1 key/value heads of size 16"
    ):
        PrefixModel.from_prefix(other, tmp_path)


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


def test_per_layer_head_sizes_decode() -> None:
    model_type, fields = DECODERS["gemma4_per_layer_heads"]
    check_decoding(PrefixModel(tiny_model(model_type, **fields), PrefixConfig(length=3)).eval(), ROWS, steps=4)


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


@pytest.mark.parametrize("family", sorted(ENCODER_DECODERS))
def test_encoder_decoder_real_word_rule(family: str) -> None:
    model_type, fields = ENCODER_DECODERS[family]
    reference = tiny_model(model_type, **fields)
    model = prefixed_from_words(model_type, fields)
    assert {site.group for site in model.sites} == {"encoder", "decoder", "cross"}
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
        PrefixModel(tiny_model(model_type, **fields), PrefixConfig(length=2))
