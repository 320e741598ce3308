"""Checks of a composed config that run before anything is loaded, so a typo costs seconds, not a model load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefix_lightning.backbones import DTYPES, EMBEDDED, SOURCES
from prefix_lightning.config import PrefixConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and what it accepts."""


def _require(condition: bool, option: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r} is not valid: {accepted}")


def _positive_or_null(cfg: DictConfig, option: str) -> None:
    value = OmegaConf.select(cfg, option)
    _require(value is None or (isinstance(value, int) and value > 0), option, value, "use a positive integer or null")


def _check_backbone(backbone: DictConfig) -> None:
    source, name = backbone.source, backbone.name
    _require(source in SOURCES, "model.backbone.source", source, f"allowed: {', '.join(SOURCES)}")
    _require(
        backbone.get("dtype", "float32") in DTYPES,
        "model.backbone.dtype",
        backbone.get("dtype"),
        f"allowed: {', '.join(DTYPES)}",
    )
    if source == "embedded":
        _require(name in EMBEDDED, "model.backbone.name", name, f"embedded models: {', '.join(EMBEDDED)}")
    elif source == "hub" and (name.startswith((".", "/", "~")) or Path(name).suffix):
        _require(
            Path(name).expanduser().is_dir(),
            "model.backbone.name",
            name,
            "no such local model folder (give an existing folder or a Hugging Face Hub id such as gpt2)",
        )


def check_config(cfg: DictConfig) -> PrefixConfig:
    """Validate the options a run depends on; return the prefix config they describe."""
    settings = OmegaConf.to_container(cfg.prefix, resolve=True)
    settings.pop("init_text", None)
    try:
        prefix = PrefixConfig(**settings)
    except TypeError as error:
        options = ", ".join(PrefixConfig.__annotations__)
        raise ConfigError(f"unknown prefix option ({error}); options: {options}") from error
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_backbone(cfg.model.backbone)
    lr = cfg.optim.lr
    _require(isinstance(lr, (int, float)) and lr > 0, "optim.lr", lr, "the learning rate must be > 0")
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "use a value >= 0")
    _require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "use a value >= 0")
    beams = cfg.generation.get("num_beams", 1)
    _require(isinstance(beams, int) and beams >= 1, "generation.num_beams", beams, "use 1 (greedy) or more beams")
    tokens = cfg.generation.get("max_new_tokens", 1)
    _require(isinstance(tokens, int) and tokens >= 1, "generation.max_new_tokens", tokens, "use a positive integer")
    for option in ("data.train_size", "data.val_size", "data.test_size", "data.batch_size", "data.eval_batch_size"):
        _positive_or_null(cfg, option)
    steps = cfg.trainer.get("max_steps", -1)
    _require(steps == -1 or steps > 0, "trainer.max_steps", steps, "use a positive number of steps, or -1 for epochs")
    return prefix
