"""Score an exported prefix, or the plain LM, on the configured test split without training.

    python -m prefix_lightning.evaluate prefix_path=outputs/train/<run>/prefix   # a trained prefix
    python -m prefix_lightning.evaluate                                          # the un-tuned LM, same prompts

Takes the same config groups as run.py (model, data, generation, ...); writes test generations and metrics
into its own run folder.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from prefix_lightning.cli import report_errors
from prefix_lightning.prefix import PrefixModel
from prefix_lightning.training.build import build_datamodule, build_module, load_configured_backbone
from prefix_lightning.training.checks import check_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> float:
    """Test BLEU of ``cfg.prefix_path`` on ``cfg.model``, or of the plain LM when no prefix is given."""
    check_config(cfg)
    lm, tokenizer = load_configured_backbone(cfg)
    if cfg.prefix_path:
        model = PrefixModel.from_prefix(lm, cfg.prefix_path)
        log.info("evaluating the prefix in %s", cfg.prefix_path)
    else:
        model = PrefixModel(lm, length=1)
        log.info("no prefix_path given: evaluating the plain LM on the same prompts")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    module = build_module(cfg, model, tokenizer)
    with nullcontext() if cfg.prefix_path else model.prefix_disabled():
        (metrics,) = trainer.test(module, datamodule=build_datamodule(cfg, tokenizer, model))
    return metrics["test/bleu"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return report_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
