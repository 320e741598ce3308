"""Frozen linear layers through oneDNN on CPU: same outputs and input gradients, and only where that is exact."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import prefix_lightning.onednn_linear as onednn_linear
from prefix_lightning.onednn_linear import LAYERS, can_use_onednn, route_frozen_linears
from tests.test_beam_search import left_padded, prefixed
from tests.test_prefix_model import tiny_lm

IDS = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def onednn_calls(monkeypatch) -> list[int]:
    """One entry per product oneDNN computes."""
    calls: list[int] = []
    linear = onednn_linear._linear
    monkeypatch.setattr(onednn_linear, "_linear", lambda *args: calls.append(1) or linear(*args))
    return calls


def layers_of(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if type(module) in LAYERS]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_same_outputs_and_input_gradients(kind, onednn_calls) -> None:
    """GPT-2's Conv1D (weights stored transposed, bias), Llama's bias-free Linear, BART's encoder and decoder."""
    assert can_use_onednn()  # the pinned CPU wheel of torch comes with oneDNN, and CI runs on x86
    reference, routed = tiny_lm(kind).requires_grad_(False), tiny_lm(kind).requires_grad_(False)
    assert route_frozen_linears(routed) == len(layers_of(routed))
    results = []
    for lm in (reference, routed):
        embeddings = lm.get_input_embeddings()(IDS).detach().requires_grad_(True)
        inputs = {"inputs_embeds": embeddings}
        if kind == "bart":
            inputs["decoder_input_ids"] = IDS[:, :4]
        logits = lm(**inputs).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits.detach(), embeddings.grad))
    # Each layer forward, and backward where the gradient reaches it (not BART's first decoder projections).
    count = len(layers_of(routed))
    assert len(onednn_calls) == 2 * count if kind != "bart" else count < len(onednn_calls) < 2 * count
    for expected, got in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_trainable_weights_other_dtypes_and_autocast_run_the_layers_own_forward(onednn_calls) -> None:
    lm = tiny_lm("llama").requires_grad_(False)
    route_frozen_linears(lm)
    layer = lm.model.layers[0].mlp.up_proj
    inputs = torch.randn(2, 3, layer.in_features)
    layer.requires_grad_(True)
    layer(inputs).sum().backward()
    assert layer.weight.grad is not None  # its own forward: the weight learns
    layer.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(inputs).dtype == torch.bfloat16  # autocast still chooses the dtype
    double = copy.deepcopy(layer).double()
    torch.testing.assert_close(double(inputs.double()), nn.functional.linear(inputs.double(), double.weight))
    assert not onednn_calls
    assert torch.equal(layer(inputs[:0]), nn.functional.linear(inputs[:0], layer.weight))
    layer(inputs)
    assert len(onednn_calls) == 1


def test_prefix_model_trains_and_decodes_as_without_onednn(monkeypatch) -> None:
    """The prefix's gradients and the decoded sequences (greedy and beam) equal those of torch's own layers."""
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    runs = []
    for routed in (False, True):
        with monkeypatch.context() as patch:
            if not routed:
                patch.setattr(onednn_linear.torch.backends.mkldnn, "is_available", lambda: False)
            model = prefixed("gpt2")  # in eval mode: no dropout
        assert any("forward" in vars(layer) for layer in layers_of(model.lm)) == routed
        model.loss(labels=labels, input_ids=ids, attention_mask=mask).backward()
        gradients = [parameter.grad for parameter in model.trainable_parameters()]
        options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=2)
        runs.append((gradients, model.generate(**options, num_beams=1), model.generate(**options, num_beams=3)))
    (plain_gradients, *plain_outputs), (gradients, *outputs) = runs
    for expected, got in zip(plain_gradients, gradients, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    for expected, got in zip(plain_outputs, outputs, strict=True):
        assert torch.equal(got, expected)


def test_a_routed_model_pickles_and_copies() -> None:
    """Spawned DDP workers get the model pickled."""
    model = prefixed("llama")
    ids, mask = left_padded()
    options = dict(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=6, eos_token_id=2)
    expected = model.generate(**options)
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert all(layer.forward.args[0] is layer for layer in layers_of(twin.lm))  # its own layers, not ours
        assert torch.equal(twin.generate(**options), expected)
