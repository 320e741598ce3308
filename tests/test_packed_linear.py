"""Decoding with the frozen LM's linear layers packed for oneDNN: same results, packed once, only where safe."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import prefix_lightning.decoding.packed_linear as packed_linear
from prefix_lightning.decoding.packed_linear import can_pack, packed_linears
from tests.helpers.decoding import left_padded, prefixed
from tests.helpers.tiny import tiny_lm

IDS = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))


def linear_layers(lm: nn.Module) -> list[nn.Module]:
    return [module for module in lm.modules() if type(module) in (nn.Linear, Conv1D)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_same_logits_through_packed_weights(kind, monkeypatch) -> None:
    """GPT-2's Conv1D (transposed weights, bias), Llama's bias-free Linear, BART's encoder and decoder."""
    assert can_pack()  # the pinned CPU wheel of torch comes with oneDNN
    lm = tiny_lm(kind).requires_grad_(False)
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]} if kind == "bart" else {"input_ids": IDS}
    calls = []
    forward = packed_linear._packed_forward
    monkeypatch.setattr(packed_linear, "_packed_forward", lambda *args: calls.append(1) or forward(*args))
    with torch.no_grad():
        expected = lm(**inputs).logits
        packed: dict = {}
        with packed_linears(lm, packed) as count:
            got = lm(**inputs).logits
    layers = linear_layers(lm)
    assert count == len(packed) == len(layers) and len(calls) >= len(layers) - 1  # BART's head only on the decoder
    assert not any("forward" in vars(module) for module in layers)  # the layers are themselves again
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_once_and_again_where_a_weight_changed() -> None:
    lm = tiny_lm("llama").requires_grad_(False)
    packed: dict = {}
    with packed_linears(lm, packed):
        pass
    first = {name: entry[1] for name, entry in packed.items()}
    head = lm.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(2.0)  # in place: same storage, a new version
        expected = lm(IDS).logits
        with packed_linears(lm, packed):
            got = lm(IDS).logits
    changed = [name for name, entry in packed.items() if entry[1] is not first[name]]
    assert changed == ["lm_head"]  # only the changed weight is packed again
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_trainable_weights_and_autocast_are_left_alone() -> None:
    lm = tiny_lm("llama").requires_grad_(False)
    lm.model.layers[0].mlp.requires_grad_(True)
    packed: dict = {}
    with packed_linears(lm, packed) as count:
        assert "forward" not in vars(lm.model.layers[0].mlp.up_proj)
    assert count == len(linear_layers(lm)) - 3
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(lm, {}) as count:
        assert count == 0


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_uses_them_with_unchanged_outputs(beams, monkeypatch) -> None:
    """PrefixModel.generate packs once, keeps them for the next call, and frees them when training resumes."""
    model = prefixed("llama")
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=8, eos_token_id=2)
    with monkeypatch.context() as patch:
        patch.setattr(packed_linear.torch.backends.mkldnn, "is_available", lambda: False)
        plain = model.generate(**options)
        assert not model.packed_weights
    packed = model.generate(**options)
    assert torch.equal(packed, plain)
    kept = dict(model.packed_weights)
    assert len(kept) == len(linear_layers(model.lm))
    model.generate(**options)
    assert all(model.packed_weights[name][1] is entry[1] for name, entry in kept.items())
    model.train()
    assert not model.packed_weights


def test_a_model_that_decoded_can_be_pickled_and_copied() -> None:
    """Spawned DDP workers get the model pickled; packed weights cannot be, so copies start without them."""
    model = prefixed("llama")
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=6, eos_token_id=2)
    expected = model.generate(**options)
    assert model.packed_weights
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not twin.packed_weights
        assert torch.equal(twin.generate(**options), expected) and twin.packed_weights
    assert model.packed_weights  # the original keeps its own
