"""A quantized frozen LM (``model.backbone.quantization``): the blocks' linear layers stored in 8 or 4 bits
(bitsandbytes), a float32 prefix trained through them, decoding that leaves them to their own kernels, and clear
refusals of what cannot work. Tiny random models on CPU; the real SmolLM2 in int8 is in test_smollm2_e2e."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_lightning import PrefixConfig, PrefixModel, load_backbone
from prefix_lightning.backbones import BackboneConfig
from prefix_lightning.backbones.quantization import quantize, quantized_layers
from prefix_lightning.baselines import FullFineTuning, LoRA, TopLayers
from prefix_lightning.decoding.packed_linear import can_pack, packed_linears
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.train import train
from tests.helpers.checkpointing import assert_checkpointing_keeps_gradients
from tests.helpers.cli import FAST
from tests.helpers.config import compose_train
from tests.helpers.quantized import needs_bitsandbytes
from tests.helpers.tiny import PAD, ROWS, pad_batch, tiny_lm, training_batch

pytestmark = needs_bitsandbytes

QUANTIZATIONS = ["int8", "int4"]
KINDS = ["gpt2", "llama", "bart", "t5"]
ENCODER_DECODERS = ("bart", "t5")


def float_linears(model: nn.Module) -> list[str]:
    """Linear layers (GPT-2's Conv1D too) with a plain floating-point weight."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, Conv1D) and type(module.weight) is nn.Parameter
    ]


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the bytes each quantized weight is stored as, to show that training leaves them as they were."""
    return {
        name: model.get_submodule(name).weight.as_subclass(torch.Tensor).clone() for name in quantized_layers(model)
    }


def unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[n].cpu(), after[n].cpu()) for n in before)


def quantized_tiny_lm(kind: str, quantization: str) -> nn.Module:
    return quantize(tiny_lm(kind), quantization)


def trained_losses(
    model: PrefixModel | LoRA, batch: dict[str, torch.Tensor], steps: int, check: Callable[[], bool] = lambda: True
) -> list[float]:
    """The loss of each of ``steps`` AdamW steps (lr 1e-2) on ``batch``; ``check()`` must hold after each backward."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(**batch)
        loss.backward()
        assert check()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_block_linears_are_quantized_and_the_rest_stays_float(kind: str, quantization: str) -> None:
    reference = tiny_lm(kind)
    lm = quantize(tiny_lm(kind), quantization)
    output = lm.get_output_embeddings()
    reference_output = reference.get_output_embeddings()
    before = [name for name in float_linears(reference) if reference.get_submodule(name) is not reference_output]
    kept = [name for name in before if name.endswith(".wo")]  # T5's _keep_in_fp32_modules
    assert quantized_layers(lm) == [name for name in before if name not in kept]  # in place (GPT-2's Conv1D too)
    assert [lm.get_submodule(name) for name in float_linears(lm)] == [lm.get_submodule(n) for n in kept] + [output]
    assert bool(kept) == (kind == "t5")
    assert output.weight.dtype == torch.float32
    tied = reference_output.weight is reference.get_input_embeddings().weight
    assert (output.weight is lm.get_input_embeddings().weight) == tied
    assert not any(p.requires_grad for name in quantized_layers(lm) for p in lm.get_submodule(name).parameters())
    bits = {"int8": 8, "int4": 4}[quantization]
    for name, data in stored(lm).items():
        float_bytes = reference.get_submodule(name).weight.numel() * 4
        assert data.numel() * data.element_size() == float_bytes * bits // 32
    ids, mask = pad_batch(ROWS, left=kind not in ENCODER_DECODERS)
    extra = {"decoder_input_ids": ids} if kind in ENCODER_DECODERS else {}
    with torch.no_grad():
        exact = reference(input_ids=ids, attention_mask=mask, **extra).logits
        approximate = lm(input_ids=ids, attention_mask=mask, **extra).logits
    similarity = nn.functional.cosine_similarity(exact.flatten(), approximate.flatten(), dim=0)
    # NF4 errs by 9% (relative norm) on a Gaussian matrix and by up to 48% on some of these tiny layers: the tiny
    # T5's logits keep a cosine of 0.94 (measured on an AMD EPYC), the other models' 0.98 and more.
    assert similarity > {"int8": 0.999, "int4": 0.9}[quantization]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_trains_through_the_quantized_lm(kind: str, quantization: str) -> None:
    """Invariant 2 on a quantized LM: the prefix (float32) learns, the LM's stored weights stay as they were."""
    model = PrefixModel(quantized_tiny_lm(kind, quantization), PrefixConfig(length=3, hidden_dim=16))
    weights_before = stored(model.lm)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    batch = training_batch(kind in ENCODER_DECODERS)
    losses = trained_losses(model, batch, 10, check=lambda: all(p.grad is None for p in model.lm.parameters()))
    assert losses[-1] < 0.99 * losses[0], losses
    after = stored(model.lm)
    assert unchanged(weights_before, after)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_decoding_leaves_the_quantized_layers_differentiable(quantization: str) -> None:
    """A run decodes (validation, no gradient) between training steps: afterwards the prefix gets the gradients of a
    model that never decoded. (bitsandbytes 0.50, on CPUs with AVX512-BF16, repacked 4-bit weights at a forward
    without gradient into a layout that has no backward: the prefix got none. Layers 64 wide: one 4-bit block.)"""
    decoded, fresh = (
        PrefixModel(quantize(tiny_lm("llama", hidden_size=64, intermediate_size=128), quantization), length=3)
        for _ in range(2)
    )
    fresh.encoders.load_state_dict(decoded.encoders.state_dict())
    batch = training_batch(False)
    decoded.eval().generate(input_ids=batch["input_ids"][:1], max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    for model in (decoded.train(), fresh.train()):
        model.loss(**batch).backward()
    for got, expected in zip(decoded.trainable_parameters(), fresh.trainable_parameters(), strict=True):
        assert got.grad is not None and expected.grad is not None
        torch.testing.assert_close(got.grad, expected.grad)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_gradient_checkpointing_through_the_quantized_lm(quantization: str) -> None:
    """Invariant 5 on a quantized LM: recomputing its layers in backward gives the same prefix gradients."""
    model = PrefixModel(quantized_tiny_lm("llama", quantization), PrefixConfig(length=3, hidden_dim=16)).train()
    batch = training_batch(False)
    assert_checkpointing_keeps_gradients(model, lambda: model.loss(**batch))


def test_int8_backward_keeps_nothing_of_the_layer_input() -> None:
    """bitsandbytes' own int8 backward keeps every layer's input alive (memory spent for the frozen weight's
    gradient); ours gives the same input gradient from the weight alone."""
    import bitsandbytes as bnb

    layer = quantize(tiny_lm("llama"), "int8").get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)

    def backward_through(forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[bool, torch.Tensor]:
        layer_input = x * 2
        watch = weakref.ref(layer_input)
        output = forward(layer_input)
        del layer_input
        kept = watch() is not None
        output.sum().backward()
        assert x.grad is not None
        gradient, x.grad = x.grad, None
        return kept, gradient

    ours_kept, ours = backward_through(layer)
    theirs_kept, theirs = backward_through(partial(bnb.nn.Linear8bitLt.forward, layer))
    assert theirs_kept and not ours_kept
    torch.testing.assert_close(ours, theirs)


def _greedy_without_cache(model: PrefixModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoding_a_quantized_lm(kind: str, quantization: str) -> None:
    """Invariant 3 on a quantized LM (greedy = uncached argmax; a left-padded batch = one input at a time, greedy
    and beam search); on CPU only the float output layer is packed for oneDNN, the quantized ones keep theirs."""
    model = PrefixModel(quantized_tiny_lm(kind, quantization), PrefixConfig(length=3)).eval()
    if can_pack():
        with packed_linears(model.lm, {}) as packed:
            assert packed == 1
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    beam = dict(greedy, num_beams=3)
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        for settings in (greedy, beam):
            singles = [model.generate(input_ids=row[None], **settings)[0] for row in ROWS]
            batched = model.generate(input_ids=ids, attention_mask=mask, **settings)
            for i, (row, single) in enumerate(zip(ROWS, singles, strict=True)):
                assert torch.equal(batched[i, ids.shape[1] - len(row) :], single)
        for row, single in zip(ROWS, [model.generate(input_ids=r[None], **greedy)[0] for r in ROWS], strict=True):
            assert torch.equal(single, _greedy_without_cache(model, row[None], 6)[0])


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_a_quantized_lm_reloads_its_own_state_after_a_forward(quantization: str) -> None:
    """Lightning's spawned DDP loads the workers' weights into the main process's model; bitsandbytes' int8 layer
    refused its own state dict once a forward had moved its scales."""
    lm = quantized_tiny_lm("llama", quantization)
    ids, mask = pad_batch(ROWS, left=False)
    with torch.no_grad():
        before = lm(input_ids=ids, attention_mask=mask).logits
        lm.load_state_dict(lm.state_dict(), strict=False)  # as Lightning loads it
        torch.testing.assert_close(lm(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_prefix_exported_from_a_quantized_lm_reloads(quantization: str, tmp_path: Path) -> None:
    """The export is the float32 prefix: it reloads exactly onto the quantized LM, and onto the float LM as well."""
    model = PrefixModel(quantized_tiny_lm("llama", quantization), PrefixConfig(length=3, hidden_dim=16)).eval()
    model.save(tmp_path)
    loaded = PrefixModel.from_prefix(quantized_tiny_lm("llama", quantization), tmp_path).eval()
    on_float_lm = PrefixModel.from_prefix(tiny_lm("llama"), tmp_path).eval()
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)
        float_logits = on_float_lm(input_ids=ids, attention_mask=mask).logits
    similarity = nn.functional.cosine_similarity(float_logits.flatten(), logits.flatten(), dim=0)
    assert similarity > {"int8": 0.999, "int4": 0.95}[quantization]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_lora_trains_on_a_quantized_lm(quantization: str) -> None:
    """QLoRA's setting: peft puts its adapters around bitsandbytes' layers."""
    method = LoRA(quantized_tiny_lm("llama", quantization), rank=4, alpha=8)
    weights_before = stored(method.lm)
    trainable = method.trainable_parameters()
    assert trainable and all("lora_" in name for name, p in method.named_parameters() if p.requires_grad)
    losses = trained_losses(method, training_batch(False), 5)
    assert losses[-1] < losses[0], losses
    after = stored(method.lm)
    assert unchanged(weights_before, after)


@pytest.mark.parametrize("method", [FullFineTuning, TopLayers])
def test_methods_that_train_the_lms_weights_refuse_a_quantized_lm(method: type) -> None:
    with pytest.raises(ValueError, match="trains the LM's own weights, which cannot train in quantized form"):
        method(quantized_tiny_lm("llama", "int8"))


def test_load_backbone_quantizes_after_loading(gpt2_tokenizer) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    tokenizer = gpt2_tokenizer.name_or_path
    lm, _ = load_backbone("random", "llama", tokenizer=tokenizer, random_config=config, quantization="int8")
    assert not lm.training
    assert len(quantized_layers(lm)) == 2 * 7  # q, k, v, o, gate, up, down in each block


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone.quantization=int3"], "model.backbone: unknown quantization 'int3'; allowed: int8, int4"),
        (["model.backbone.quantization=int8", "method=full"], "method full trains the LM's own weights"),
        (["model.backbone.quantization=int4", "method=top2"], "method top2 trains the LM's own weights"),
    ],
)
def test_bad_combinations_are_refused_before_loading(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train(tmp_path, ["model=tiny_llama", *overrides]))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_a_missing_library_is_named_with_its_install_command(
    quantization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = "bitsandbytes"
    monkeypatch.setitem(sys.modules, library, None)  # what Python sees where the package is not installed
    with pytest.raises(ModuleNotFoundError, match=f"quantization={quantization} needs {library}.*pip install"):
        BackboneConfig(
            "random", "llama", tokenizer="t", random_config={"model_type": "llama"}, quantization=quantization
        )
    with pytest.raises(ConfigError, match=f"model.backbone: quantization={quantization} needs {library}"):
        check_config(compose_train(tmp_path, ["model=tiny_llama", f"model.backbone.quantization={quantization}"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_prefix_trains_through_a_quantized_lm_on_cuda(quantization: str) -> None:
    model = PrefixModel(quantized_tiny_lm("llama", quantization), PrefixConfig(length=3, hidden_dim=16)).to("cuda")
    weights_before = stored(model.lm)
    batch = {key: value.to("cuda") for key, value in training_batch(False).items()}
    losses = trained_losses(model, batch, 10)
    assert losses[-1] < losses[0] - 0.1, losses
    after = stored(model.lm)
    assert all(data.is_cuda for data in after.values())
    assert unchanged(weights_before, after)
    ids, mask = pad_batch(ROWS, left=True)
    with torch.no_grad():
        model.eval().generate(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), num_beams=3, max_new_tokens=4, pad_token_id=PAD
        )


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_a_run_trains_and_exports_a_prefix_on_a_quantized_lm(quantization: str, tmp_path: Path) -> None:
    """train(cfg) as run.py calls it: the checkpoint holds only the prefix (never the quantized LM), the export
    is the float32 prefix, the test split is decoded."""
    cfg = compose_train(tmp_path, [*FAST, f"model.backbone.quantization={quantization}"])
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])
    assert {t.dtype for t in load_file(tmp_path / "prefix" / "prefix.safetensors").values()} == {torch.float32}
    assert len((tmp_path / "test_generations.jsonl").read_text().splitlines()) == cfg.data.test_size
