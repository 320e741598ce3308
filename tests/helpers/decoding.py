"""What the decoding tests compare on: a tiny prefixed LM whose inputs end after different numbers of steps, and
random left-padded prompts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module

import pytest
import torch
from transformers import PreTrainedModel

import prefix_lightning.decoding.routes as routes
from prefix_lightning import PrefixConfig, PrefixModel
from tests.helpers.tiny import VOCAB, pad_batch, tiny_lm

# Peaked next-token distributions (the usual 0.02 makes them nearly uniform), and an end token made likelier
# (its output embedding scaled) so that the inputs end after different numbers of tokens.
INIT, END = 0.5, 2
BOOST = {"gpt2": 1.8, "llama": 3.5}
LENGTHS = (5, 2, 7, 3, 4, 6)


def ending_lm(family: str) -> PreTrainedModel:
    """A tiny causal LM (gpt2 or llama) that ends its outputs at different steps."""
    overrides = {"initializer_range": INIT} | ({"n_positions": 128} if family == "gpt2" else {})
    lm = tiny_lm(family, **overrides)
    with torch.no_grad():
        lm.get_output_embeddings().weight[END] *= BOOST[family]
    return lm


def prefixed(family: str, prefix_kind: str = "prefix") -> PrefixModel:
    """``ending_lm`` with a random prefix (large enough to change its outputs)."""
    model = PrefixModel(ending_lm(family), PrefixConfig(length=3, reparam="none", kind=prefix_kind))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.encoders.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def left_padded(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths`` tokens (no special tokens), left-padded, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    return pad_batch([torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths], left=True)


@contextmanager
def transformers_search(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """PrefixModel.generate with transformers' beam search (what it does for options beam_search lacks)."""
    with monkeypatch.context() as patch:
        patch.setattr(routes, "beam_search_options", lambda lm, kwargs: None)
        yield


@contextmanager
def static_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Our beam search's steps static on any device (the CUDA route, without the graph on the CPU)."""
    with monkeypatch.context() as patch:
        module = import_module("prefix_lightning.decoding.beam_search")  # which the package's function hides
        patch.setattr(module, "static_steps_pay", lambda lm, device: True)
        yield


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster than on threads that wait for busy cores (autouse in
    the modules that import it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def rows_per_forward(lm: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of every forward of ``lm`` on tokens (embedding-only's prefix is the LM's activations of
    embeddings)."""
    rows: list[int] = []

    def count(module, args, kwargs) -> None:
        if kwargs.get("input_ids") is not None:
            rows.append(kwargs["input_ids"].shape[0])

    handle = lm.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def ours_against_transformers(
    model: PrefixModel, monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor, mask: torch.Tensor | None, **options
) -> tuple[torch.Tensor, list[int]]:
    """Our sequences (asserted equal to transformers') and the rows of each of our forwards: the prompt (one row
    per input), then one per step."""
    with rows_per_forward(model.lm) as rows:
        ours = model.generate(input_ids=ids, attention_mask=mask, **options)
    with transformers_search(monkeypatch):
        theirs = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    return ours, rows
