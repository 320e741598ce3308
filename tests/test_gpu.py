"""What only a GPU can check: bf16 training, FSDP, our beam search and the compiled transformer on CUDA. A GPU
machine runs them with ``pytest -m gpu``; where CUDA is absent they are skipped (CI has none)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefix_lightning import PrefixModel
from prefix_lightning.prefix import attention
from tests.helpers.cli import FAST, run_cli
from tests.helpers.decoding import END, left_padded, prefixed, transformers_search
from tests.helpers.tiny import PAD, tiny_lm, training_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _trained(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "prefix" / "prefix.safetensors")


def _test_bleu(run: Path) -> float:
    return json.loads((run / "result.json").read_text())["test"]["test/bleu"]


@pytest.mark.integration
@pytest.mark.parametrize("compiled", [[], ["model.compile=true"]], ids=["eager", "compiled"])
def test_bf16_run_trains_validates_decodes_and_exports_a_float32_prefix(
    compiled: list[str], tmp_path: Path, data_dir: Path
) -> None:
    """Eager, and with ``model.compile=true`` (inductor) through the whole run."""
    run_cli(tmp_path, *FAST, "trainer=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", *compiled)
    exported = _trained(tmp_path)
    assert exported and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in exported.values())
    assert (tmp_path / "test_generations.txt").read_text().strip()
    assert _test_bleu(tmp_path) >= 0


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp_run_trains_as_the_plain_gpu_run(precision: str, tmp_path: Path, data_dir: Path) -> None:
    """One GPU under FSDP (gradient clipping by norm on, as by default) keeps prefix-only checkpoints, and its
    exported prefix gives the plain GPU run's logits: to float32's rounding, and to bf16's under bf16-mixed, where
    FSDP's mixed precision computes with every parameter cast to bf16 (the prefix's and the norms' too) while
    autocast keeps them float32 outside matrix products."""
    fsdp, plain = tmp_path / "fsdp", tmp_path / "plain"
    run_cli(fsdp, *FAST, "trainer=fsdp", "trainer.devices=1", f"trainer.precision={precision}")
    run_cli(plain, *FAST, "trainer=gpu", "trainer.devices=1", f"trainer.precision={precision}")
    checkpoint = torch.load(fsdp / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])
    batch = {name: tensor.cuda() for name, tensor in training_batch(False).items()}
    with torch.no_grad():  # both prefixes on one LM of the runs' shape (model=tiny_llama)
        ours, reference = (
            PrefixModel.from_prefix(tiny_lm("llama", num_hidden_layers=2).cuda(), run / "prefix")(**batch).logits
            for run in (fsdp, plain)
        )
    assert not torch.equal(ours, tiny_lm("llama", num_hidden_layers=2).cuda()(**batch).logits)  # a prefix acts
    tolerance = dict(rtol=1e-4, atol=1e-4) if precision == "32-true" else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(ours, reference, **tolerance)
    if precision == "32-true":
        assert _test_bleu(fsdp) == pytest.approx(_test_bleu(plain), abs=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 5])
def test_decoding_on_cuda_equals_transformers(kind: str, beams: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam search's steps after the first replay one CUDA graph (greedy search is transformers' own)."""
    model = prefixed(kind).cuda()
    ids, mask = (tensor.cuda() for tensor in left_padded())
    options = dict(num_beams=beams, max_new_tokens=15, eos_token_id=END, pad_token_id=PAD)
    with replays_counted(monkeypatch) as replays:
        ours = model.generate(input_ids=ids, attention_mask=mask, **options)
    with transformers_search(monkeypatch):
        theirs = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(ours, theirs)
    assert (len(replays) > 1) == (beams > 1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoding_graph_captured_under_autocast_replays_the_eager_steps(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As validation and testing decode in a bf16-mixed run: a bf16 LM under autocast. The graph's sequences are those
    of the same static steps run eager (not the growing steps': their shapes differ, and with them bf16's last bits,
    which part near-tied beams: on the CPU, 1 token of GPT-2's 6 x 22)."""
    model = prefixed(kind).cuda().to(torch.bfloat16)
    ids, mask = (tensor.cuda() for tensor in left_padded())
    options = dict(num_beams=5, max_new_tokens=15, eos_token_id=END, pad_token_id=PAD)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with replays_counted(monkeypatch) as replays:
            graphed = model.generate(input_ids=ids, attention_mask=mask, **options)
        with monkeypatch.context() as patch:
            patch.setattr(import_module("prefix_lightning.decoding.steps"), "_captured", lambda step: None)
            eager = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert replays and torch.equal(graphed, eager)


def test_an_lm_that_cannot_be_captured_decodes_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An LM whose forward waits for the GPU (as a mixture of experts' routing does) cannot become a CUDA graph."""
    model = prefixed("llama").cuda()
    ids, mask = (tensor.cuda() for tensor in left_padded())
    options = dict(num_beams=5, max_new_tokens=15, eos_token_id=END, pad_token_id=PAD)
    with transformers_search(monkeypatch):
        theirs = model.generate(input_ids=ids, attention_mask=mask, **options)
    model.lm.model.layers[0].register_forward_hook(waits_for_the_gpu)
    with replays_counted(monkeypatch) as replays:
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), theirs)
        assert not replays and "without a CUDA graph" in caplog.text
        caplog.clear()  # later searches of the LM grow, without trying again
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), theirs)
        assert not replays and "without a CUDA graph" not in caplog.text


def waits_for_the_gpu(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
    """A host synchronization in the forward (the output left as it is)."""
    float(output[0].sum())


@contextmanager
def replays_counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    replays: list[int] = []
    replay = torch.cuda.CUDAGraph.replay
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
        yield replays


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_a_prefix_wraps_an_lm_already_on_cuda(kind: str, tmp_path: Path) -> None:
    """Made, initialized from words, trained, exported and loaded where the LM is (no ``.to()`` of the wrapper)."""
    model = PrefixModel(tiny_lm(kind).cuda(), length=3)
    model.init_prefix_from_tokens([5, 6, 7])
    batch = {name: tensor.cuda() for name, tensor in training_batch(kind == "bart").items()}
    model(**batch).loss.backward()
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert all(parameter.is_cuda and parameter.grad is not None for parameter in trained)
    loaded = PrefixModel.from_prefix(tiny_lm(kind).cuda(), model.save(tmp_path / "prefix"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


def test_grouped_key_value_heads_reach_the_flash_kernel_as_they_are() -> None:
    """In bf16 on a GPU the flash kernel takes the prefix's causal attention of a grouped-query layer with its
    key/value heads as they are (tests/test_prefix_model.py: the same loss and gradients as repeated heads)."""
    query = torch.randn(2, 4, 5, 8, dtype=torch.bfloat16, device="cuda")  # 4 query heads, 2 key/value heads
    key = value = torch.randn(2, 2, 8, 8, dtype=torch.bfloat16, device="cuda")
    assert attention.flash_takes_grouped_heads(query, key, value)
    assert not attention.flash_takes_grouped_heads(query.float(), key.float(), value.float())  # no flash in float32
