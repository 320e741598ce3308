"""Every shipped config composes, and instantiates against the code that reads it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prefix_lightning.backbones import load_backbone
from prefix_lightning.data.datamodule import TextToTextDataModule
from prefix_lightning.data.multitask import MultiTaskDataModule
from prefix_lightning.methods import IGNORE_INDEX, TrainableLM
from prefix_lightning.prefix import PrefixConfig
from prefix_lightning.training.build import build_model, generation_settings
from prefix_lightning.training.checkpoint_io import AtomicCheckpointIO
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.tasks import task_data_configs
from prefix_lightning.training.train import instantiate_all
from tests.helpers.config import CONF, compose_train, options


def test_every_group_has_its_options() -> None:
    assert {"smollm2_135m", "gpt2", "gpt2_medium", "tiny_gpt2", "tiny_llama", "tiny_bart"} <= set(options("model"))
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb", "none"} <= set(options("logger"))


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_match_the_loader(name: str, tmp_path: Path) -> None:
    overrides = [f"model={name}"]
    random_config = compose_train(tmp_path, overrides).model.backbone.get("random_config")
    if random_config is not None and OmegaConf.is_missing(random_config, "like"):  # model=random_like: a folder
        tiny_llama = compose_train(tmp_path, ["model=tiny_llama"]).model.backbone
        load_backbone(**OmegaConf.to_container(tiny_llama, resolve=True))[0].save_pretrained(tmp_path / "like")
        overrides.append(f"model.backbone.random_config.like={tmp_path / 'like'}")
    cfg = compose_train(tmp_path, overrides)
    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    inspect.signature(load_backbone).bind(**backbone)
    assert isinstance(cfg.model.separator, str) and isinstance(cfg.model.target_end, str)
    # What the README sets on any model (model.backbone.quantization=int8, ...): a key missing here is refused.
    assert {"dtype", "quantization"} <= set(backbone) and {"gradient_checkpointing", "compile"} <= set(cfg.model)
    if backbone["source"] == "random":
        if backbone["random_config"].get("num_hidden_layers", 0) > 2:  # real shapes (GPU presets): one layer here
            cfg = compose_train(tmp_path, [*overrides, "model.backbone.random_config.num_hidden_layers=1"])
        model, tokenizer = build_model(cfg)
        assert model.config.length == cfg.prefix.length
        assert generation_settings(cfg, tokenizer)["eos_token_id"] == tokenizer.convert_tokens_to_ids(
            cfg.model.target_end
        )


@pytest.mark.parametrize("name", options("prefix"))
def test_prefix_configs_build_their_prefix(name: str, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [f"prefix={name}", "model=tiny_llama"])
    model, _ = build_model(cfg)
    assert model.config == PrefixConfig.of(OmegaConf.to_container(cfg.prefix))
    assert (model.encoders["self"].mlp is None) == (cfg.prefix.reparam == "none")


@pytest.mark.parametrize("name", options("method"))
def test_method_configs_build_their_model(name: str, tmp_path: Path) -> None:
    """Each method file's options are the keywords of the code that builds it (tests/test_methods.py trains them)."""
    cfg = compose_train(tmp_path, [f"method={name}", "model=tiny_llama"])
    rows: dict[str, list[str]] = {}
    if "tasks" in cfg.method.model:  # one prefix per task: trained on a mixture of tasks, each row names its task
        cfg = compose_train(tmp_path, ["data=multi", f"method={name}", "model=tiny_llama"])
        rows = {"prefixes": list(cfg.data.tasks)}
        assert len(rows["prefixes"]) == 2
    model, _ = build_model(cfg)
    # By name: isinstance on the protocol finds no submodule (lm) on Python >= 3.12, which looks attributes up
    # statically, and an nn.Module keeps its submodules in a table of its own.
    interface = [name for name in vars(TrainableLM) if not name.startswith("_")]
    assert "lm" in interface
    assert [name for name in interface if not hasattr(model, name)] == [], "the class lacks part of the interface"
    trainable = model.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    ids = torch.arange(3, 11).repeat(2, 1)
    labels = ids.masked_fill(torch.arange(8) < 3, IGNORE_INDEX)  # the first 3 tokens are the source
    model.loss(labels=labels, input_ids=ids, attention_mask=torch.ones_like(ids), **rows).backward()
    assert all(p.grad is not None for p in trainable), "the loss must reach everything the method trains"
    assert cfg.callbacks.export.dirpath == f"{tmp_path}/{cfg.method.export_dir}"
    written = model.save(cfg.callbacks.export.dirpath)
    assert any(path.stat().st_size > 0 for path in written.iterdir())


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_instantiate(name: str, tmp_path: Path, gpt2_tokenizer) -> None:
    cfg = compose_train(tmp_path, [f"data={name}", "model=tiny_gpt2"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if "tasks" in data:  # a mixture: each task's own data config
        data["tasks"] = task_data_configs(cfg)
    datamodule = instantiate(data, tokenizer=gpt2_tokenizer, separator=" =", target_end="<|endoftext|>")
    if isinstance(datamodule, MultiTaskDataModule):
        assert list(datamodule.tasks) == list(cfg.data.tasks)
        assert all(isinstance(part, TextToTextDataModule) for part in datamodule.tasks.values())
        return
    del data["_target_"]
    given = {key: value for key, value in data.items() if value is not None}  # None: the dataset's own
    assert {key: datamodule.hparams[key] for key in given} == given


# DeepSpeed's trainers refuse a CPU: tests/test_distributed.py instantiates and checks their strategies.
SHARDED = ("deepspeed",)


@pytest.mark.parametrize("name", [name for name in options("trainer") if not name.startswith(SHARDED)])
def test_trainer_configs_instantiate(name: str, tmp_path: Path) -> None:
    # GPU configs are checked on the CPU here: same keys, same strategy, only the accelerator differs.
    overrides = [f"trainer={name}"] + (["trainer.accelerator=cpu"] if name in ("gpu", "ddp", "slurm", "fsdp") else [])
    settings = compose_train(tmp_path, overrides).trainer
    trainer = instantiate(settings)
    assert (trainer.max_steps, trainer.precision, trainer.accumulate_grad_batches, trainer.gradient_clip_val) == (
        settings.max_steps,
        settings.precision,
        settings.accumulate_grad_batches,
        settings.gradient_clip_val,
    )
    assert trainer.num_devices == (1 if settings.devices == "auto" else settings.devices)  # "auto": 1 CPU
    assert trainer.num_nodes == settings.get("num_nodes", 1)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # checkpoints are written atomically


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_callback_and_logger_configs_instantiate(group: str, tmp_path: Path) -> None:
    for name in options(group):
        cfg = compose_train(tmp_path, [f"{group}={name}"])
        settle_optimized_metric(cfg)  # as train() does: the checkpoint and early stopping callbacks monitor it
        entries = instantiate_all(cfg.get(group))
        switched_off = int(group == "callbacks" and cfg.callbacks.early_stopping.patience is None)
        assert len(entries) == len(cfg.get(group) or {}) - switched_off
        written = [getattr(entry, "dirpath", None) or getattr(entry, "save_dir", None) for entry in entries]
        folders = [Path(folder) for folder in written if folder is not None]
        assert all(folder.is_relative_to(tmp_path) for folder in folders), f"{name} writes outside the run: {folders}"


@pytest.mark.parametrize("name", options("debug"))
def test_debug_configs_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [f"debug={name}"])
    assert cfg.trainer.max_steps <= 10


def test_evaluate_config_composes_on_top_of_train(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.output_dir={tmp_path}", "prefix_path=somewhere"])
    assert cfg.task_name == "evaluate" and cfg.prefix_path == "somewhere"
    assert cfg.model.backbone.source == "embedded" and cfg.data.test_size == 100
