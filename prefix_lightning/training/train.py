"""``train(cfg)``: one run from a composed config, returning the metric that sweepers optimize."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.training.build import build_datamodule, build_model, build_module
from prefix_lightning.training.resume import finished_record, resume_checkpoint

log = logging.getLogger(__name__)

# The frozen LM stays in eval mode on purpose (no LM dropout); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named entries so that configs can add or drop one by name."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


def train(cfg: DictConfig) -> float | None:
    """Train, test and export the configured method; return ``cfg.optimized_metric`` from validation (for
    sweepers).

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
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
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
