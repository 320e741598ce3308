"""Every `method` choice trains through the same harness (train(cfg)) on a tiny model: only what the method is
meant to train changes, and the checkpoint and the export hold only that."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefix_lightning.training.build import build_model
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.train import train
from tests.helpers.config import compose_train

QUICK = ["model=tiny_llama", "debug=fast", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2"]


def recording_frozen_weights(run_dir: Path) -> list[str]:
    """Overrides that add tests.helpers.recorders.FrozenWeights to the run (it writes frozen_changed.json)."""
    return ["+callbacks.frozen._target_=tests.helpers.recorders.FrozenWeights", f"+callbacks.frozen.folder={run_dir}"]


def changed_frozen_weights(run_dir: Path, model: torch.nn.Module) -> list[str]:
    """What FrozenWeights saw change among the weights ``model`` (the method as built) does not train."""
    report = json.loads((run_dir / "frozen_changed.json").read_text())
    assert report["frozen"] == sum(not p.requires_grad for p in model.parameters()), "it saw another model"
    return report["changed"]


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


@pytest.mark.integration
@pytest.mark.parametrize(("method", "overrides"), CASES)
def test_each_method_trains_and_saves_only_its_own_parameters(method: str, overrides: list[str], tmp_path) -> None:
    layers = ["method.model.layers=1"] if method == "top2" else []
    cfg = compose_train(
        tmp_path, [*QUICK, f"method={method}", *layers, *overrides, *recording_frozen_weights(tmp_path)]
    )
    model, _ = build_model(cfg)
    intended, export_files = EXPECTED[method]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if overrides == ["prefix=direct"]:
        assert trainable == {"encoders.self.prefix"}
    assert trainable and all(intended(name) for name in trainable), sorted(trainable)[:5]

    train(cfg)  # builds its own model with the same seed: compare the artifacts with this untouched copy
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {name.removeprefix("model.") for name in checkpoint["state_dict"]}
    assert saved == trainable
    initial = dict(model.named_parameters())
    changed = {name for name in saved if not torch.equal(checkpoint["state_dict"][f"model.{name}"], initial[name])}
    assert changed == trainable, f"unchanged by training: {sorted(trainable - changed)[:5]}"
    assert changed_frozen_weights(tmp_path, model) == []
    export = tmp_path / cfg.method.export_dir
    assert {path.name for path in export.iterdir()} == export_files
    mask = os.umask(0)  # reading it sets it
    os.umask(mask)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in export.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes  # as readable as any new file (safetensors: 0600)
    if method in ("full", "top2"):
        tensors = {}
        for file in export.glob("*.safetensors"):
            tensors |= load_file(file)
        assert len(tensors) == len(trainable) if method == "top2" else len(tensors) >= len(trainable) - 1
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


@pytest.mark.integration
def test_embedding_only_export_is_the_input_embeddings(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*QUICK, "method=embedding", "prefix.length=3"])
    train(cfg)
    tensors = load_file(tmp_path / "prefix" / "prefix.safetensors")
    assert set(tensors) == {"input.0"} and tensors["input.0"].shape == (3, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.model._target_=adapters.Adapter"], "method.model._target_='adapters.Adapter' is not a class"),
        (["method=lora", "+method.model.rnak=4"], "LoRA takes no option rnak; options: \\['alpha', 'dropout'"),
        (["method=full", "prefix.init_text=table-to-text:"], "start a prefix, infix or embedding; method full"),
        (["prefix.init_text=hello", "prefix.init_vocab=true"], "choose one initialization"),
        (["method=lora", "method.model.rank=true"], "method.model.rank=True is not valid: LoRA takes an integer"),
        (["method=top2", "method.model.layers=true"], "method.model.layers=True is not valid: TopLayers takes an"),
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
    initialized, tokenizer = build_model(compose_train(tmp_path, [*QUICK, f"method={method}", init]))
    with torch.no_grad():
        before, after = random.materialized(), initialized.materialized()
    assert all(not torch.allclose(a, b) for k in after for a, b in zip(before[k], after[k], strict=True))
    if init.startswith("prefix.init_text"):  # the words' own activations (embeddings), not any other start
        random.init_prefix_from_tokens(tokenizer("table-to-text:", add_special_tokens=False).input_ids)
        with torch.no_grad():
            expected = random.materialized()
        for group, blocks in expected.items():
            for got, meant in zip(after[group], blocks, strict=True):
                torch.testing.assert_close(got, meant)
    elif method == "embedding":  # drawn tokens: each row is (the MLP's fit of) one token's input embedding
        table = initialized.lm.get_input_embeddings().weight
        with torch.no_grad():
            nearest = torch.cdist(initialized.prefix_encoders["input"]()[0], table).min(1).values
        assert bool((nearest < 0.05 * table.norm(dim=1).mean()).all()), nearest


# The README's example of a new method: tests/helpers/toy_method.py holds the class.
NORMS_METHOD = """\
# The LM's normalization weights train; the rest stays frozen.
name: norms
model:
  _target_: tests.helpers.toy_method.NormTuning
lr: 1.0e-2
export_dir: norms
"""


@pytest.mark.integration
def test_a_new_method_is_one_class_and_one_yaml_file(tmp_path: Path) -> None:
    """method/norms.yaml in a config folder of one's own, on Hydra's search path: it trains through train(cfg)
    like the shipped methods, only its parameters change, and its export is written."""
    conf, run = tmp_path / "conf", tmp_path / "run"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "norms.yaml").write_text(NORMS_METHOD)
    overrides = [f"hydra.searchpath=[file://{conf}]", *QUICK, "method=norms", *recording_frozen_weights(run)]
    cfg = compose_train(run, overrides)
    model, _ = build_model(cfg)  # what train(cfg) builds: same config, same seed
    norms = {name for name, p in model.named_parameters() if p.requires_grad}
    assert norms == {name for name, _ in model.named_parameters() if name.endswith("norm.weight")}
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    train(cfg)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    trained = {name.removeprefix("model."): tensor for name, tensor in checkpoint["state_dict"].items()}
    assert trained.keys() == norms
    assert all(not torch.equal(trained[name], initial[name]) for name in norms)
    assert changed_frozen_weights(run, model) == []
    exported = load_file(run / "norms" / "norms.safetensors")
    assert {f"lm.{name}" for name in exported} == norms
    assert all(torch.equal(tensor, trained[f"lm.{name}"]) for name, tensor in exported.items())
    # Its card says what its own save wrote, not "the whole fine-tuned model", and offers no load_export that fails.
    card = (run / "norms" / "README.md").read_text()
    assert (
        "This folder holds what the method trained: the files that the method's own save wrote (norms.safetensors)"
        in (card)
    )
    assert "load_export(lm" not in card and "With the code of the method `norms`" in card


def toy_method_config(conf: Path, name: str, cls: str) -> Path:
    """conf/method/<name>.yaml of one of tests/helpers/toy_method.py's classes, in the config folder ``conf``."""
    (conf / "method").mkdir(parents=True, exist_ok=True)
    config = NORMS_METHOD.replace("name: norms", f"name: {name}").replace("NormTuning", cls)
    (conf / "method" / f"{name}.yaml").write_text(config)
    return conf


def test_a_method_that_trains_nothing_is_named_as_it_is_built(tmp_path: Path) -> None:
    """torch said "optimizer got an empty parameter list", once the run had loaded and tokenized everything."""
    conf = toy_method_config(tmp_path / "conf", "frozen", "TrainsNothing")
    cfg = compose_train(tmp_path / "run", [f"hydra.searchpath=[file://{conf}]", *QUICK, "method=frozen"])
    with pytest.raises(ValueError, match=r"method frozen: TrainsNothing.trainable_parameters\(\) is empty"):
        build_model(cfg)


@pytest.mark.integration
def test_a_method_whose_save_writes_nothing_is_named_at_the_export(tmp_path: Path) -> None:
    """The export's size and card failed on a folder that did not exist ("No such file or directory")."""
    conf = toy_method_config(tmp_path / "conf", "nosave", "SavesNothing")
    cfg = compose_train(tmp_path / "run", [f"hydra.searchpath=[file://{conf}]", *QUICK, "method=nosave"])
    with pytest.raises(RuntimeError, match=r"SavesNothing.save\('.*/run/norms'\) wrote nothing there: a method's save"):
        train(cfg)
