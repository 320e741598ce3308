"""Every `method` choice trains through the same harness (train(cfg)) on a tiny model: only what the method is
meant to train changes, and the checkpoint and the export hold only that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefix_lightning.training.build import build_model
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.train import train
from tests.helpers import compose_train

QUICK = ["model=tiny_llama", "debug=fast", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2"]

# method -> (names of the parameters it trains, files its export holds); every export has a README.md model card,
# a prefix of a decoder-only LM also PEFT's adapter files
PREFIX_FILES = {"prefix.safetensors", "prefix_config.json", "README.md"}
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
EXPECTED = {
    "prefix": (lambda name: name.startswith("encoders.self."), PREFIX_FILES | PEFT_FILES),
    "embedding": (lambda name: name.startswith("encoders.input."), PREFIX_FILES),
    "infix": (lambda name: name.startswith("encoders.self."), PREFIX_FILES),
    "full": (lambda name: True, {"config.json", "generation_config.json", "model.safetensors", "README.md"}),
    # tiny_llama has 2 layers: the top 2 are all of them, so the test trains the top 1 (method.model.layers=1)
    "top2": (lambda name: ".layers.1." in name, {"top_layers.safetensors", "top_layers.json", "README.md"}),
    "lora": (lambda name: "lora_" in name, PEFT_FILES),
    "peft_prefix": (lambda name: "prompt_encoder" in name, PEFT_FILES),
}


# (method, more overrides): every method file, and the prefix without its MLP (prefix=direct)
CASES = [(method, []) for method in sorted(EXPECTED)] + [("prefix", ["prefix=direct"])]


@pytest.mark.parametrize(("method", "overrides"), CASES)
def test_each_method_trains_and_saves_only_its_own_parameters(method: str, overrides: list[str], tmp_path) -> None:
    layers = ["method.model.layers=1"] if method == "top2" else []
    cfg = compose_train(tmp_path, [*QUICK, f"method={method}", *layers, *overrides])
    model, _ = build_model(cfg)
    intended, export_files = EXPECTED[method]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if overrides == ["prefix=direct"]:
        assert trainable == {"encoders.self.prefix"}
    assert trainable and all(intended(name) for name in trainable), sorted(trainable)[:5]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    train(cfg)  # builds its own model with the same seed: compare the artifacts with this untouched copy
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {name.removeprefix("model.") for name in checkpoint["state_dict"]}
    assert saved == trainable
    changed = {
        name
        for name, tensor in checkpoint["state_dict"].items()
        if not torch.equal(tensor, dict(model.named_parameters())[name.removeprefix("model.")])
    }
    assert changed, "training changed nothing"
    export = tmp_path / cfg.method.export_dir
    assert {path.name for path in export.iterdir()} == export_files
    if method in ("full", "top2"):
        tensors = {}
        for file in export.glob("*.safetensors"):
            tensors |= load_file(file)
        assert len(tensors) == len(trainable) if method == "top2" else len(tensors) >= len(trainable) - 1
    assert frozen_before.keys().isdisjoint(trainable)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_embedding_only_export_is_the_input_embeddings(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*QUICK, "method=embedding", "prefix.length=3"])
    train(cfg)
    tensors = load_file(tmp_path / "prefix" / "prefix.safetensors")
    assert set(tensors) == {"input"} and tensors["input"].shape == (3, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.model._target_=adapters.Adapter"], "method.model._target_='adapters.Adapter' is not a class"),
        (["method=lora", "+method.model.rnak=4"], "LoRA takes no option rnak; options: \\['alpha', 'dropout'"),
        (["method=full", "prefix.init_text=table-to-text:"], "start a prefix, infix or embedding; method full"),
        (["prefix.init_text=hello", "prefix.init_vocab=true"], "choose one initialization"),
    ],
)
def test_bad_method_options_are_named_before_loading(overrides: list[str], message: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train(tmp_path, [*QUICK, *overrides]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=top2", "method.model.layers=0"], "top_layers: layers must be between 1 and 2"),
        (["method=lora", "method.model.rank=0"], "LoRA rank must be a positive integer, got 0"),
        (["method=peft_prefix", "prefix.dropout=0.1"], "PEFT's prefix tuning has no prefix dropout"),
    ],
)
def test_bad_method_values_are_refused_by_the_method(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(compose_train(tmp_path, [*QUICK, *overrides]))


@pytest.mark.parametrize("init", ["prefix.init_text=table-to-text:", "prefix.init_vocab=true"])
@pytest.mark.parametrize("method", ["prefix", "embedding"])
def test_initialization_options_set_the_prefix(method: str, init: str, tmp_path: Path) -> None:
    random, _ = build_model(compose_train(tmp_path, [*QUICK, f"method={method}"]))
    initialized, _ = build_model(compose_train(tmp_path, [*QUICK, f"method={method}", init]))
    with torch.no_grad():
        before = {k: v for k, v in random.materialized().items()}
        after = initialized.materialized()
    assert all(not torch.allclose(before[k], after[k]) for k in after)
