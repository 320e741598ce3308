"""The compiled transformer blocks (``model.compile``): the same losses, gradients and beam searches as eager mode,
one compilation for every block, no compilation again for batches of new lengths. The CPU tests compile through
``aot_eager`` (dynamo's graph capture and AOTAutograd's backward, without generating kernels: seconds instead of
minutes); tests/test_gpu.py runs inductor on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from prefix_lightning import PrefixModel
from prefix_lightning.backbones.compiled import compile_lm
from prefix_lightning.decoding.packed_linear import PackedWeights, can_pack, packed_linears
from prefix_lightning.training.build import build_model
from prefix_lightning.training.checks import ConfigError
from tests.helpers.cli import FAST, run_cli
from tests.helpers.config import compose_train
from tests.helpers.decoding import left_padded, prefixed
from tests.helpers.tiny import PAD, PAIRS, tiny_lm, training_batch

BACKEND = "aot_eager"


def _compiled(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s modules that run compiled."""
    return [name for name, module in model.named_modules() if getattr(module, "_compiled_call_impl", None)]


def _loss_and_gradients(model: PrefixModel, batch: dict[str, torch.Tensor], drop_mask: bool) -> list[torch.Tensor]:
    model.zero_grad()
    loss = model.loss(drop_right_padding_mask=drop_mask, **batch)
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.trainable_parameters())]


def _pairs(extra: int) -> list[tuple[list[int], list[int]]]:
    """PAIRS with ``extra`` more target tokens in the first (a batch of a new width)."""
    (source, target), *rest = PAIRS
    return [(source, target + list(range(70, 70 + extra))), *rest]


# Each compiles for tens of seconds on two cores: integration tier. GPT-2 with its padding mask (learned positions,
# Conv1D) and Llama without it (rotary positions, grouped-query attention, the prefix's bottom-right causal columns).
@pytest.mark.integration
@pytest.mark.parametrize(("family", "drop_mask"), [("gpt2", False), ("llama", True)])
def test_compiled_lm_trains_like_eager_without_compiling_again(family: str, drop_mask: bool) -> None:
    torch._dynamo.reset()
    eager, compiled = (PrefixModel(tiny_lm(family), length=3) for _ in range(2))
    compile_lm(compiled.lm, BACKEND)
    for step, extra in enumerate((0, 2, 5)):
        current = training_batch(encoder_decoder=False, pairs=_pairs(extra))
        expected = _loss_and_gradients(eager, current, drop_mask)
        got = _loss_and_gradients(compiled, current, drop_mask)
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    # dynamic shapes: batches of new widths ran through the graphs the first one made
    assert counters["stats"]["unique_graphs"] == graphs > 0


@pytest.mark.integration
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_lm_decodes_like_eager_after_training(family: str) -> None:
    """Training, validation's loss and decoding in one process, batches of one row among them: every graph they need
    fits the recompile limit (past it, dynamo would silently run the rest in eager mode; its default of 8 did not
    hold them)."""
    torch._dynamo.reset()
    eager, compiled = prefixed(family), prefixed(family)
    compile_lm(compiled.lm, BACKEND)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled.train()
        for pairs in (_pairs(0), _pairs(3), PAIRS[:1]):
            compiled.loss(**training_batch(encoder_decoder=False, pairs=pairs)).backward()
        compiled.eval()
        with torch.no_grad():
            for pairs in (PAIRS, PAIRS[:1]):
                compiled.loss(**training_batch(encoder_decoder=False, pairs=pairs))
        ids, mask = left_padded()
        options = dict(num_beams=3, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD)
        decoded = compiled.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(decoded, eager.generate(input_ids=ids, attention_mask=mask, **options))


@pytest.mark.integration
def test_one_compilation_serves_every_block() -> None:
    """The blocks share their compiled code (regional compilation): a model of 4 blocks makes the graphs that one
    of 2 makes, where compiling the stack as one graph would grow with the depth."""
    graphs = []
    for blocks in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = PrefixModel(tiny_lm("llama", num_hidden_layers=blocks), length=3)
        compile_lm(model.lm, BACKEND)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            model.loss(**training_batch(encoder_decoder=False)).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0


# GPT-2 with its padding mask widened, Llama with the prefix's causal columns, an infix read by the target only.
@pytest.mark.integration
@pytest.mark.parametrize(
    ("family", "drop_mask", "kind"), [("gpt2", False, "prefix"), ("llama", True, "prefix"), ("llama", True, "infix")]
)
def test_compiled_block_traces_the_prefix_attention(family: str, drop_mask: bool, kind: str) -> None:
    """A training step runs each block as one graph forward and one backward: the prefix's attention is traced into
    the block's graph, where each break would cost the host another guarded call forward and backward (the compiled
    step's cost on a GPU, docs/gpu.md)."""
    torch._dynamo.reset()
    counters.clear()
    model = PrefixModel(tiny_lm(family), length=3, kind=kind)
    compile_lm(model.lm, BACKEND)
    model.loss(drop_right_padding_mask=drop_mask, **training_batch(encoder_decoder=False)).backward()
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"]


def test_compiled_blocks_decode_eager_with_the_packed_linear_layers() -> None:
    """Decoding runs the compiled blocks eager (decoding.routes), so the CPU's packed layers serve them too."""
    lm = tiny_lm("llama").requires_grad_(False)  # frozen, as packing wants it
    with packed_linears(lm, PackedWeights()) as eager_count:
        pass
    compile_lm(lm, BACKEND)
    with packed_linears(lm, PackedWeights()) as count:
        pass
    assert count == eager_count and (count > 0) == can_pack()


def test_compiling_keeps_parameter_names() -> None:
    lm = tiny_lm("llama")
    names = list(lm.state_dict())
    compile_lm(lm, BACKEND)
    assert list(lm.state_dict()) == names


def test_model_compile_setting_compiles_the_built_method(tmp_path) -> None:
    plain, _ = build_model(compose_train(tmp_path, ["model=tiny_llama"]))
    assert not _compiled(plain)
    model, _ = build_model(compose_train(tmp_path, ["model=tiny_llama", f"model.compile={BACKEND}"]))
    assert _compiled(model.lm) == [f"model.layers.{i}" for i in range(model.lm.config.num_hidden_layers)]


@pytest.mark.integration
def test_compiled_run_trains_validates_tests_and_exports_the_eager_runs_prefix(tmp_path: Path, data_dir: Path) -> None:
    """A whole run with ``model.compile`` (Lightning's loop, validation's decoding, checkpoints, the export) ends
    with the prefix and the test outputs of the same run in eager mode."""
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    run_cli(compiled, *FAST, f"model.compile={BACKEND}")
    run_cli(eager, *FAST)
    ours, reference = (load_file(run / "prefix" / "prefix.safetensors") for run in (compiled, eager))
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5)
    outputs = [(run / "test_generations.txt").read_text() for run in (compiled, eager)]
    assert outputs[0] == outputs[1]


def test_an_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.compile='indcutor'.*inductor"):
        build_model(compose_train(tmp_path, ["model=tiny_llama", "model.compile=indcutor"]))


def test_a_model_without_marked_blocks_is_refused() -> None:
    lm = tiny_lm("llama")
    lm.model.layers = torch.nn.ModuleList([torch.nn.Identity()])  # blocks that transformers does not mark
    with pytest.raises(ValueError, match="no transformer blocks .* in LlamaForCausalLM: leave model.compile off"):
        compile_lm(lm, BACKEND)
