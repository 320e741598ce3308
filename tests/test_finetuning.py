"""The fine-tuning baselines on tiny random models: each trains exactly its own parameters, shares the project's
loss, saves only what it trains, and decodes (PEFT's prefix with its prefix, as our PrefixModel does)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.baselines import (
    FineTunedLM,
    FullFineTuning,
    LoRA,
    PeftPrefixTuning,
    TopLayers,
    decoder_blocks,
    load_top_layers,
)
from tests.helpers.peft import set_peft_prefix
from tests.helpers.tiny import PAD, VOCAB, padded, tiny_lm, training_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls transformers' deprecated names

# Three blocks everywhere, so that the top two are not the whole stack.
DEEPER = {"llama": {}, "gpt2": dict(n_layer=3), "bart": dict(decoder_layers=3)}
METHODS = {"full": FullFineTuning, "top_layers": TopLayers, "lora": LoRA, "peft_prefix": PeftPrefixTuning}
OPTIONS = {"lora": dict(rank=4, alpha=8), "peft_prefix": dict(config=PrefixConfig(length=3, hidden_dim=16))}
PROMPTS = [[10, 11, 12, 13, 14], [20, 21, 22]]
CASES = [("llama", method) for method in METHODS] + [("gpt2", "full"), ("bart", "top_layers")]


def deeper_lm(kind: str):
    """The tiny model of ``kind`` with three decoder blocks."""
    return tiny_lm(kind, **DEEPER[kind])


def prompt_batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": padded(PROMPTS, PAD, left=True),
        "attention_mask": padded([[1] * len(p) for p in PROMPTS], 0, left=True),
    }


def build(kind: str, method: str) -> FineTunedLM:
    return METHODS[method](deeper_lm(kind), **OPTIONS.get(method, {}))


def train_steps(model: FineTunedLM, steps: int = 3) -> None:
    model.train()
    batch = training_batch(model.lm.config.is_encoder_decoder)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model.loss(**batch)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def expected_trainable(model: FineTunedLM) -> set[str]:
    """What the method should train, named in ``model.state_dict()`` (tied copies included)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if isinstance(model, FullFineTuning):
        return names
    if isinstance(model, TopLayers):
        name, blocks = decoder_blocks(model.lm)
        top = tuple(f"lm.{name}.{i}." for i in (len(blocks) - 2, len(blocks) - 1))
        return {n for n in names if n.startswith(top)}
    if isinstance(model, LoRA):
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    return {n for n in names if n.startswith("lm.prompt_encoder.")}


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_training_changes_exactly_the_intended_parameters(kind: str, method: str) -> None:
    model = build(kind, method)
    intended = expected_trainable(model)
    assert intended and {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad} == intended
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == intended


@pytest.mark.parametrize(
    ("kind", "name"), [("llama", "model.layers"), ("gpt2", "transformer.h"), ("bart", "model.decoder.layers")]
)
def test_top_layers_are_the_blocks_that_produce_the_output(kind: str, name: str) -> None:
    assert decoder_blocks(deeper_lm(kind))[0] == name


def test_methods_train_with_the_lms_own_dropout() -> None:
    model = build("gpt2", "full").train()
    assert all(module.training for module in model.lm.modules())
    assert not model.eval().lm.training


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_loss_is_the_lms_own_loss(kind: str, method: str) -> None:
    """The project's target loss (target-position logits, length groups) equals ``lm(**batch).loss``; for PEFT's
    prefix tuning that is ``peft_model(**batch).loss``, with the prefix."""
    model = build(kind, method).eval()
    with torch.no_grad():  # LoRA starts as the identity: make the adapter count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = training_batch(kind == "bart")
    parameters = model.trainable_parameters()
    reference = model.lm(**batch).loss
    expected = torch.autograd.grad(reference, parameters)
    for groups in (None, 1, 2):
        loss = model.loss(**batch, length_groups=groups)
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
        for got, want in zip(torch.autograd.grad(loss, parameters), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if method in ("lora", "peft_prefix"):
        bare = model.lm.get_base_model()
        with model.lm.disable_adapter():
            assert not torch.allclose(bare(**batch).loss, reference, atol=1e-4), "the adapter must be in the loss"


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits  # BART's decoder reads the labels


@pytest.mark.parametrize(("kind", "method"), [case for case in CASES if case != ("gpt2", "full")])
def test_save_writes_only_the_trained_tensors_and_reloads(kind: str, method: str, tmp_path) -> None:
    model = build(kind, method)
    train_steps(model, steps=1)
    batch = training_batch(kind == "bart")
    trained = _logits(model, batch)
    trainable = {n.removeprefix("lm."): p for n, p in model.named_parameters() if p.requires_grad}
    folder = model.save(tmp_path / "export")
    if method == "full":
        assert set(load_file(folder / "model.safetensors")) == set(trainable)
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
    elif method == "top_layers":
        saved = load_file(folder / "top_layers.safetensors")
        assert saved.keys() == trainable.keys() and all(torch.equal(saved[n], p) for n, p in trainable.items())
        description = json.loads((folder / "top_layers.json").read_text())
        assert description["method"] == "top_layers" and description["layers"] == 2
        assert description["base_model"]["model_type"] == kind
        reloaded = load_top_layers(deeper_lm(kind), folder)
    else:
        saved = load_file(folder / "adapter_model.safetensors")
        if method == "lora":  # peft drops the adapter's name from the keys
            assert len(saved) == len(trainable) and all(".lora_A." in n or ".lora_B." in n for n in saved)
        else:  # the prefix as PEFT exports it: materialized, MLP dropped
            assert set(saved) == {"prompt_embeddings"} and saved["prompt_embeddings"].shape[0] == 3
        reloaded = PeftModel.from_pretrained(deeper_lm(kind), folder).eval()
    torch.testing.assert_close(_logits(reloaded, batch), trained, atol=1e-5, rtol=1e-5)


def test_top_layers_refuse_another_base_model(tmp_path) -> None:
    build("llama", "top_layers").save(tmp_path)
    with pytest.raises(ValueError, match="trained for .*llama.* this base model \\(gpt2\\)"):
        load_top_layers(deeper_lm("gpt2"), tmp_path)


@pytest.mark.parametrize("method", ["full", "top_layers", "lora"])
def test_generate_left_padded_batch(method: str) -> None:
    model = build("llama", method)
    train_steps(model, steps=1)
    batch = prompt_batch()
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = model.generate(**batch, **settings)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4) and torch.equal(out[:, :-4], batch["input_ids"])
    single = model.generate(input_ids=torch.tensor([PROMPTS[1]]), **settings)[0]
    assert torch.equal(out[1, -len(single) :], single)


def test_peft_prefix_generates_as_our_prefix_with_the_same_values() -> None:
    """PEFT's own generate would decode as the bare LM; ours and PEFT's prefix with equal values must agree."""
    ours = PrefixModel(deeper_lm("llama"), PrefixConfig(length=3, reparam="none")).eval()
    theirs = PeftPrefixTuning(deeper_lm("llama"), PrefixConfig(length=3, reparam="none")).eval()
    with torch.no_grad():
        set_peft_prefix(theirs.lm, ours.prefix_key_values())
    batch = prompt_batch()
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    generated = theirs.generate(**batch, **settings)
    assert torch.equal(generated, ours.generate(**batch, **settings))
    assert not torch.equal(generated, theirs.lm.get_base_model().generate(**batch, **settings))


@pytest.mark.parametrize("method", ["full", "top_layers", "lora"])
def test_gradient_checkpointing_recomputes_with_the_same_gradients(method: str) -> None:
    model = build("llama", method).train()
    batch = training_batch(False)
    mlp_calls = []
    # A pre-hook: non-reentrant recomputation stops once it has what backward needs, before the MLP returns.
    lm = model.lm.get_base_model() if method == "lora" else model.lm
    lm.model.layers[-1].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))

    def gradients() -> list[torch.Tensor]:
        mlp_calls.clear()
        return list(torch.autograd.grad(model.loss(**batch, length_groups=1), model.trainable_parameters()))

    plain, plain_calls = gradients(), len(mlp_calls)
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert len(mlp_calls) == 2 * plain_calls
    for got, want in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        build("llama", "peft_prefix").enable_gradient_checkpointing()


def test_clear_errors() -> None:
    for layers in (0, 4, True):  # true is no count of layers, though bool is an int
        with pytest.raises(ValueError, match="layers must be between 1 and 3 \\(model.layers\\)"):
            TopLayers(deeper_lm("llama"), layers=layers)
    with pytest.raises(ValueError, match="peft_prefix covers causal LMs only"):
        PeftPrefixTuning(deeper_lm("bart"))
    for rank in (0, True):
        with pytest.raises(ValueError, match=f"LoRA rank must be a positive integer, got {rank}"):
            LoRA(deeper_lm("llama"), rank=rank)
    with pytest.raises(ValueError, match="starts from random values"):
        PeftPrefixTuning(deeper_lm("llama"), PrefixConfig(init_text="table-to-text:"))
    with pytest.raises(ValueError, match="no prefix dropout"):
        PeftPrefixTuning(deeper_lm("llama"), PrefixConfig(dropout=0.1))
    with pytest.raises(ValueError, match="not 'infix'"):
        PeftPrefixTuning(deeper_lm("llama"), PrefixConfig(kind="infix"))
    mamba = AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    for method in ("lora", "peft_prefix"):
        with pytest.raises(ValueError, match=f"peft cannot apply {method} to MambaForCausalLM \\(mamba\\)"):
            METHODS[method](AutoModelForCausalLM.from_config(mamba))
