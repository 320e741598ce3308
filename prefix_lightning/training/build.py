"""Building a run's parts from its composed config: the method around the backbone, the data, the module."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch._dynamo.exc import InvalidBackend
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from prefix_lightning.backbones import load_backbone
from prefix_lightning.backbones.compiled import compile_lm
from prefix_lightning.data.datamodule import TextToTextDataModule
from prefix_lightning.data.multitask import MultiTaskDataModule
from prefix_lightning.methods import TrainableLM
from prefix_lightning.numbers import is_int
from prefix_lightning.prefix.positions import positions_left
from prefix_lightning.training.checks import ConfigError, check_config, method_class, method_options, options_at
from prefix_lightning.training.module import MethodModule
from prefix_lightning.training.tasks import task_data_configs

log = logging.getLogger(__name__)

# The data modules a data config builds: one dataset, or a mixture of tasks (data=multi).
RunData = TextToTextDataModule | MultiTaskDataModule

# generate() options that transformers' logits processors take as floats only: Hydra reads `temperature=2` as an
# integer, which they would refuse when generate builds them (at a run's first validation, after its training steps).
FLOAT_OPTIONS = ("temperature", "repetition_penalty", "encoder_repetition_penalty")


def load_configured_backbone(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_backbone(**options_at(cfg, "model.backbone"))


def build_model(cfg: DictConfig) -> tuple[TrainableLM, PreTrainedTokenizerBase]:
    """The configured method around the backbone (checked first, seeded, gradient checkpointing as asked)."""
    check_config(cfg)
    return build_checked_model(cfg)


def build_checked_model(cfg: DictConfig) -> tuple[TrainableLM, PreTrainedTokenizerBase]:
    """``build_model`` for a config that ``check_config`` has passed (a run checks it before it reads its data)."""
    L.seed_everything(cfg.seed, workers=True)
    lm, tokenizer = load_configured_backbone(cfg)
    model = build_method(cfg, lm, tokenizer)
    if cfg.model.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    compile_as_configured(cfg, model.lm)
    return model, tokenizer


def compile_as_configured(cfg: DictConfig, lm: PreTrainedModel) -> None:
    """``model.compile``: true (inductor) or a ``torch.compile`` backend's name compiles the LM's transformer
    blocks (called once the method around the LM is built)."""
    setting = cfg.model.get("compile")
    if not setting:
        return
    backend = "inductor" if setting is True else str(setting)
    try:
        blocks = compile_lm(lm, backend)
    except InvalidBackend as error:
        choices = ", ".join(torch._dynamo.list_backends())
        raise ConfigError(
            f"model.compile={setting!r}: true (inductor), false, or a torch.compile backend ({choices})"
        ) from error
    log.info(
        "model.compile: the LM's %d transformer blocks compile (%s, dynamic shapes, one compilation for all) at "
        "the first step; attention and decoding run eager",
        blocks,
        backend,
    )


def build_method(cfg: DictConfig, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> TrainableLM:
    """The class ``method.model._target_`` called with the LM, its other keys, and the tokenizer where the class
    takes one (called directly, not through Hydra, so that its refusals reach the user as they are)."""
    cls = method_class(cfg)
    options = method_options(cfg)
    if "tokenizer" in inspect.signature(cls).parameters:
        options["tokenizer"] = tokenizer
    model = cls(lm, **options)
    if not model.trainable_parameters():  # torch would say "optimizer got an empty parameter list"
        raise ValueError(
            f"method {cfg.method.name}: {cls.__name__}.trainable_parameters() is empty; a method trains the parameters "
            "it leaves requires_grad=True (the LM's own are frozen)"
        )
    return model


def generation_settings(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Decoding options for ``generate``, with the end-of-target token of this model's data format."""
    settings = {k: v for k, v in options_at(cfg, "generation").items() if v is not None}
    settings.update({key: float(settings[key]) for key in FLOAT_OPTIONS if is_int(settings.get(key))})
    if settings.pop("ban_newline", False):
        settings["bad_words_ids"] = newline_tokens(tokenizer)
    end_ids = tokenizer(cfg.model.target_end, add_special_tokens=False).input_ids
    if len(end_ids) != 1:
        raise ValueError(
            f"model.target_end={cfg.model.target_end!r} must be one token of the tokenizer (it is {len(end_ids)}): "
            "decoding stops on it"
        )
    settings.setdefault("eos_token_id", end_ids[0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings.setdefault("pad_token_id", pad_id)
    return settings


def newline_tokens(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Every vocabulary entry whose text holds a newline, as ``bad_words_ids`` (one-token sequences)."""
    vocabulary = range(len(tokenizer))
    return [[i] for i in vocabulary if "\n" in tokenizer.decode([i], clean_up_tokenization_spaces=False)]


class _Positioned(Protocol):
    """What the source budget reads of a model: its LM and the positions its virtual tokens take (a method, or a
    bank of prefixes)."""

    @property
    def lm(self) -> PreTrainedModel: ...

    @property
    def virtual_positions(self) -> int: ...


def source_budget(cfg: DictConfig, model: _Positioned) -> int:
    """``data.max_source_tokens``, cut down where source, target and virtual tokens would not fit the model's
    positions (see :func:`fitted_source_budget`)."""
    target = max(cfg.data.max_target_tokens, OmegaConf.select(cfg, "generation.max_new_tokens") or 0)
    return fitted_source_budget(model.lm.config, model.virtual_positions, cfg.data.max_source_tokens, target)


def fitted_source_budget(config: PretrainedConfig, virtual_positions: int, wanted: int, target: int) -> int:
    """``wanted`` source tokens, cut down where they, the ``target`` (the longer of the target as trained and as
    decoded) and the virtual tokens would not fit the positions of a model of ``config``."""
    left = positions_left(config, virtual_positions)
    if left is None:
        return wanted
    context = left + virtual_positions
    budget = left if config.is_encoder_decoder else left - target
    if budget < 1:
        raise ConfigError(
            f"a target of {target} tokens (the longer of data.max_target_tokens and generation.max_new_tokens) "
            f"plus {virtual_positions} virtual tokens leave no room for the source in the model's {context} positions"
        )
    if wanted > budget:
        log.warning(
            "data.max_source_tokens=%d does not fit the model's %d positions (%d virtual tokens%s): sources are cut "
            "to %d tokens (the data loader reports how many were cut)",
            wanted,
            context,
            virtual_positions,
            "" if config.is_encoder_decoder else f", target {target}",
            budget,
        )
    return min(wanted, budget)


def configured_data(cfg: DictConfig) -> RunData:
    """The configured data module before the model loads: it downloads and reads its splits
    (``read_data_first``), and tokenizes once ``encode_for`` gives it the model. A mixture of tasks
    (``data.tasks``) gets each task's composed data config."""
    data: dict[str, Any] = options_at(cfg, "data")
    if "tasks" in data:
        data["tasks"] = task_data_configs(cfg)
    return instantiate(
        data,
        tokenizer=None,
        separator=cfg.model.separator,
        target_end=cfg.model.target_end,
        tested=bool(cfg.get("test", True)),
    )


def read_data_first(datamodule: RunData, trainer: L.Trainer, stage: str) -> None:
    """Download what is missing and read the splits of ``stage`` before the model loads, so that a failed download
    or a missing, empty or malformed file is said in seconds, not after the model's loading (minutes for a large
    one). Only in the process that Lightning's ``prepare_data`` runs in (local rank 0; global rank 0 where data
    are not prepared per node): the data are downloaded once, and the other processes of a multi-process run,
    which may start alongside it, read in their ``setup``, after Lightning's wait for ``prepare_data``."""
    if trainer.local_rank == 0 and (datamodule.prepare_data_per_node or trainer.node_rank == 0):
        datamodule.prepare_data(stage)
        datamodule.read(stage)


def encode_for(datamodule: RunData, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, model: TrainableLM) -> None:
    """The data module tokenizes for the loaded model: its tokenizer, its layout and the source tokens its
    positions leave room for."""
    datamodule.encode_with(tokenizer, bool(model.lm.config.is_encoder_decoder), source_budget(cfg, model))


def build_module(cfg: DictConfig, model: TrainableLM, tokenizer: PreTrainedTokenizerBase) -> MethodModule:
    return MethodModule(
        model,
        tokenizer,
        output_dir=cfg.paths.output_dir,
        generation=generation_settings(cfg, tokenizer),
        lr=cfg.method.lr,
        **options_at(cfg, "optim"),
    )
