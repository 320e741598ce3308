"""``train(cfg)``: one run from a composed config, returning the metric that sweepers optimize."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.backbones import load_backbone
from prefix_lightning.config import KINDS
from prefix_lightning.finetuning import FineTunedLM
from prefix_lightning.model import PrefixModel
from prefix_lightning.sweeps.resume import finished_record, resume_checkpoint
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.module import PrefixTuningModule, TrainableLM

log = logging.getLogger(__name__)

# The frozen LM stays in eval mode on purpose (no LM dropout); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named entries so that configs can add or drop one by name."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


def load_configured_backbone(cfg: DictConfig) -> tuple[Any, Any]:
    return load_backbone(**OmegaConf.to_container(cfg.model.backbone, resolve=True))


def build_model(cfg: DictConfig) -> tuple[TrainableLM, Any]:
    """The frozen backbone with the configured method: a prefix (initialized as asked), or a fine-tuning baseline."""
    prefix_config = check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    lm, tokenizer = load_configured_backbone(cfg)
    method = cfg.method.name
    if method in KINDS:
        model: TrainableLM = PrefixModel(lm, prefix_config)
        initialize_prefix(model, cfg.prefix, tokenizer, cfg.seed)
    else:
        options = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k not in ("name", "export_dir")}
        model = FineTunedLM(lm, method, prefix=prefix_config, **options)
    if cfg.model.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    return model, tokenizer


def initialize_prefix(model: PrefixModel, prefix: DictConfig, tokenizer: Any, seed: int) -> None:
    """Random (the encoder's own init), from real words (``prefix.init_text``) or drawn tokens (``init_vocab``)."""
    if prefix.get("init_text"):
        model.init_prefix_from_tokens(tokenizer(prefix.init_text, add_special_tokens=False).input_ids)
        log.info("prefix initialized from the words %r", prefix.init_text)
    elif prefix.get("init_vocab"):
        model.init_prefix_from_vocabulary(torch.Generator().manual_seed(seed))
        log.info("prefix initialized from %d tokens drawn from the vocabulary", model.config.length)


def generation_settings(cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    """Decoding options for ``generate``, with the end-of-target token of this model's data format."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.generation, resolve=True).items() if v is not None}
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


def newline_tokens(tokenizer: Any) -> list[list[int]]:
    """Every vocabulary entry whose text holds a newline, as ``bad_words_ids`` (one-token sequences)."""
    vocabulary = range(len(tokenizer))
    return [[i] for i in vocabulary if "\n" in tokenizer.decode([i], clean_up_tokenization_spaces=False)]


def virtual_positions(cfg: DictConfig) -> int:
    """Positions the method's virtual tokens take in front of the real ones (PEFT's prefix shifts them too)."""
    if cfg.method.name == "peft_prefix" or (cfg.method.name in KINDS and cfg.prefix.shift_positions):
        return cfg.prefix.length
    return 0


def source_budget(cfg: DictConfig, model: TrainableLM) -> int:
    """``data.max_source_tokens``, cut down where source, target and prefix would not fit the model's positions."""
    wanted, target = cfg.data.max_source_tokens, cfg.data.max_target_tokens
    config = model.lm.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is None:
        return wanted
    occupied = virtual_positions(cfg)
    budget = context - occupied if config.is_encoder_decoder else context - occupied - target
    if budget < 1:
        raise ConfigError(
            f"data.max_target_tokens={target} plus {occupied} virtual tokens leave no room for the source "
            f"in the model's {context} positions"
        )
    if wanted > budget:
        log.warning(
            "data.max_source_tokens=%d does not fit the model's %d positions (%d virtual tokens%s): sources are cut "
            "to %d tokens (the data loader reports how many were cut)",
            wanted,
            context,
            occupied,
            "" if config.is_encoder_decoder else f", target {target}",
            budget,
        )
    return min(wanted, budget)


def build_datamodule(cfg: DictConfig, tokenizer: Any, model: TrainableLM) -> L.LightningDataModule:
    return instantiate(
        cfg.data,
        tokenizer=tokenizer,
        separator=cfg.model.separator,
        target_end=cfg.model.target_end,
        is_encoder_decoder=bool(model.lm.config.is_encoder_decoder),
        max_source_tokens=source_budget(cfg, model),
    )


def build_module(cfg: DictConfig, model: TrainableLM, tokenizer: Any) -> PrefixTuningModule:
    return PrefixTuningModule(
        model,
        tokenizer,
        output_dir=cfg.paths.output_dir,
        generation=generation_settings(cfg, tokenizer),
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )


def train(cfg: DictConfig) -> float | None:
    """Train a prefix, test it, export it; return ``cfg.optimized_metric`` from validation (for sweepers).

    A run folder that already holds a complete result record is not run again; one with a last checkpoint resumes.
    """
    finished = finished_record(cfg.paths.output_dir)
    if finished is not None:
        return finished["last_val"]
    started = time.perf_counter()
    model, tokenizer = build_model(cfg)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.lm.parameters())
    log.info("method %s: %s trainable parameters, LM of %s", cfg.method.name, f"{trainable:,}", f"{frozen:,}")
    datamodule = build_datamodule(cfg, tokenizer, model)
    module = build_module(cfg, model, tokenizer)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and Lightning would refuse it
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg))
    metric = trainer.callback_metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule)
    log.info("run finished in %.0f s; outputs in %s", time.perf_counter() - started, cfg.paths.output_dir)
    return None if metric is None else float(metric)
