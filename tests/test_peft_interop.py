"""Prefixes cross to PEFT and back: our export loads in ``peft.PeftModel`` with our logits, and PEFT's trained adapter
(with or without its projection MLP) loads as a PrefixModel with PEFT's logits, on tiny GPT-2 and Llama-GQA."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import PreTrainedModel

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.baselines.peft_adapter import require_peft
from prefix_lightning.prefix.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
from tests.helpers.config import REPO
from tests.helpers.families import DECODERS
from tests.helpers.tiny import ROWS, pad_batch, tiny_lm

LENGTH = 4


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: the real tokens sit at the same positions in both implementations."""
    return pad_batch(ROWS, left=False)


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ids, mask = right_padded()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def trained_prefix(kind: str) -> PrefixModel:
    """A prefix through the MLP, moved away from its initialization by a few steps."""
    model = PrefixModel(tiny_lm(kind), PrefixConfig(length=LENGTH, hidden_dim=16))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids, mask = right_padded()
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_our_export_loads_in_peft_with_our_logits(kind: str, tmp_path: Path) -> None:
    ours = trained_prefix(kind)
    ours.save(tmp_path, format="peft")
    assert sorted(path.name for path in tmp_path.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS]
    theirs = PeftModel.from_pretrained(tiny_lm(kind), tmp_path).eval()
    assert theirs.active_peft_config.num_virtual_tokens == LENGTH
    assert_same_logits(ours, theirs)
    # and back: the PEFT folder loads as the same prefix
    again = PrefixModel.from_peft(tiny_lm(kind), tmp_path)
    for name, (keys, values) in ours.prefix_key_values().items():
        torch.testing.assert_close(again.prefix_key_values()[name], (keys, values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [True, False])
def test_a_trained_peft_adapter_loads_as_our_prefix_with_peft_logits(kind: str, projection: bool, tmp_path) -> None:
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=LENGTH, prefix_projection=projection, encoder_hidden_size=16
    )
    theirs = get_peft_model(tiny_lm(kind), config)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = right_padded()
    for _ in range(3):
        theirs(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.eval().save_pretrained(tmp_path)
    ours = PrefixModel.from_peft(tiny_lm(kind), tmp_path).eval()
    assert ours.config.length == LENGTH and ours.config.shift_positions
    assert_same_logits(ours, theirs)


def test_every_prefix_export_carries_peft_files_where_peft_can_hold_it(tmp_path: Path) -> None:
    PrefixModel(tiny_lm("llama"), length=LENGTH).save(tmp_path / "llama")
    assert {PEFT_CONFIG, PEFT_WEIGHTS, "prefix_config.json"} <= {p.name for p in (tmp_path / "llama").iterdir()}
    described = json.loads((tmp_path / "llama" / PEFT_CONFIG).read_text())
    assert (described["num_layers"], described["num_attention_heads"], described["token_dim"]) == (3, 2, 16)
    # An embedded model is named by its Hub id there, which PEFT's AutoPeftModel can fetch (prefix_config.json
    # keeps the name this project checks a base model against).
    lm = tiny_lm("llama")
    lm.name_or_path = "embedded:smollm2-135m-instruct"
    PrefixModel(lm, length=LENGTH).save(tmp_path / "embedded")
    described = json.loads((tmp_path / "embedded" / PEFT_CONFIG).read_text())
    assert described["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    recorded = json.loads((tmp_path / "embedded" / "prefix_config.json").read_text())["base_model"]["name_or_path"]
    assert recorded == "embedded:smollm2-135m-instruct"


GEMMA4, GEMMA4_LAYERS = DECODERS["gemma4_per_layer_heads"]
GEMMA3, GEMMA3_LAYERS = DECODERS["gemma3"]


@pytest.mark.parametrize(
    ("family", "overrides", "prefix", "reason"),
    [
        (
            "bart",
            {},
            {},
            "PEFT's prefix for encoder-decoder models sits in the decoder's self- and cross-attention only",
        ),
        ("t5", {}, {}, "also has a prefix in every encoder self-attention layer, which PEFT has no place for"),
        (
            GEMMA4,
            GEMMA4_LAYERS,
            {},
            "PEFT's table needs one key/value shape in every layer, but model.layers.0.self_attn has 2 key/value "
            "heads of size 8 and model.layers.1.self_attn 1 of size 16",
        ),
        (GEMMA3, GEMMA3_LAYERS, {}, "model.layers.0.self_attn attends through a sliding window of 64 tokens"),
        ("gpt2", {}, {"shift_positions": False}, "this prefix was trained with shift_positions=false"),
        ("gpt2", {}, {"kind": "infix"}, "a prefix of kind 'infix' has no PEFT counterpart"),
    ],
)
def test_prefixes_peft_cannot_compute_exactly_are_refused_with_the_reason(
    family: str, overrides: dict, prefix: dict, reason: str, tmp_path: Path
) -> None:
    """Our own export leaves PEFT's files out for them; format="peft" and from_peft refuse, saying why."""
    model = PrefixModel(tiny_lm(family, **overrides), length=LENGTH, **prefix)
    model.save(tmp_path / "ours")
    assert (tmp_path / "ours" / "prefix_config.json").is_file() and not (tmp_path / "ours" / PEFT_CONFIG).exists()
    with pytest.raises(ValueError, match=f"^PEFT cannot load this prefix: .*{re.escape(reason)}"):
        model.save(tmp_path / "peft", format="peft")
    if not prefix:  # a PEFT adapter of matching size cannot be loaded onto this model either
        PrefixModel(tiny_lm("llama"), length=LENGTH).save(tmp_path / "llama", format="peft")
        with pytest.raises(ValueError, match=f"^cannot load the PEFT prefix in .*llama onto .*{re.escape(reason)}"):
            PrefixModel.from_peft(tiny_lm(family, **overrides), tmp_path / "llama")


def test_foreign_or_misfitting_adapters_are_refused_in_one_line(tmp_path: Path) -> None:
    PrefixModel(tiny_lm("llama"), length=LENGTH).save(tmp_path / "llama", format="peft")
    with pytest.raises(
        ValueError, match=r"is for 3 layers of key/value width 16 in 2 heads, but this model has 2 layers"
    ):
        PrefixModel.from_peft(tiny_lm("gpt2"), tmp_path / "llama")
    PrefixModel(tiny_lm("gpt2"), length=LENGTH).save(tmp_path / "gpt2", format="peft")  # 4 heads x 8
    with pytest.raises(ValueError, match=r"width 32 in 4 heads, but this model has 2 layers of 2 key/value heads x 16"):
        PrefixModel.from_peft(tiny_lm("gpt2", n_head=2), tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(ValueError, match=r"is a SEQ_2_SEQ_LM adapter; PEFT prefixes load onto decoder-only LMs"):
        PrefixModel.from_peft(tiny_lm("gpt2"), tmp_path / "gpt2")
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": "abc"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: num_virtual_tokens, num_layers and token_dim must be"):
        PrefixModel.from_peft(tiny_lm("gpt2"), tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match=r"is missing \(it holds a PEFT prefix adapter: PrefixModel.from_peft"):
        PrefixModel.from_prefix(tiny_lm("gpt2"), tmp_path / "gpt2")
    get_peft_model(tiny_lm("gpt2"), LoraConfig(r=2, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"describes a 'LORA' adapter, not PEFT's prefix tuning"):
        PrefixModel.from_peft(tiny_lm("gpt2"), tmp_path / "lora")
    (tmp_path / "llama" / PEFT_WEIGHTS).write_bytes(b"truncated")
    with pytest.raises(ValueError, match=rf"cannot read {tmp_path / 'llama' / PEFT_WEIGHTS}: .*truncated or corrupted"):
        PrefixModel.from_peft(tiny_lm("llama"), tmp_path / "llama")


def test_an_adapter_of_another_named_base_model_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PEFT records the base model's name, not its type: a same-shape model of another name loads, said in a
    warning (the values may mean nothing there); the model it names loads silently."""

    def named(name: str) -> PreTrainedModel:
        lm = tiny_lm("gpt2")
        lm.name_or_path = name
        return lm

    PrefixModel(named("someone/gpt2-tiny"), length=LENGTH).save(tmp_path, format="peft")
    PrefixModel.from_peft(named("someone/gpt2-tiny"), tmp_path)
    assert not caplog.records
    PrefixModel.from_peft(named("someone/other-tiny"), tmp_path)
    assert "trained on someone/gpt2-tiny; this base model is someone/other-tiny" in caplog.text


def test_without_peft_its_methods_name_the_extra_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    project = (REPO / "pyproject.toml").read_text()  # the extra, and dev through it: peft's pin once
    assert '\npeft = ["peft>=0.21,<0.22"]\n' in project and project.count("peft>=") == 1
    assert '\n    "prefix-lightning[peft]",\n' in project.partition("\ndev = [")[2].partition("]\n")[0]
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "peft" else found(name, *rest))
    with pytest.raises(
        ModuleNotFoundError, match=re.escape("method lora needs peft: pip install 'prefix-lightning[peft]'")
    ):
        require_peft("lora")
