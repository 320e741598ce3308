"""Checks of a composed config that run before anything is loaded, so a typo costs seconds, not a model load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefix_lightning.backbones import DTYPES, EMBEDDED, SOURCES
from prefix_lightning.config import KINDS, PrefixConfig
from prefix_lightning.finetuning import FINETUNING_METHODS


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


METHODS = (*KINDS, *FINETUNING_METHODS)
INIT_OPTIONS = ("init_text", "init_vocab")  # how the prefix starts, read by build_model, not by PrefixConfig


def _check_method(cfg: DictConfig) -> str:
    method = OmegaConf.select(cfg, "method.name")
    _require(method in METHODS, "method.name", method, f"allowed: {', '.join(METHODS)} (or pick a method=<file>)")
    if cfg.prefix.get("init_text") is not None or cfg.prefix.get("init_vocab"):
        _require(method in KINDS, "method", method, "prefix.init_text / init_vocab start a prefix, infix or embedding")
        _require(
            cfg.prefix.get("init_text") is None or not cfg.prefix.get("init_vocab"),
            "prefix.init_vocab",
            cfg.prefix.init_vocab,
            "choose one initialization: words (prefix.init_text) or drawn tokens (prefix.init_vocab=true)",
        )
    if method == "top_layers":
        layers = cfg.method.get("layers")
        _require(isinstance(layers, int) and layers >= 1, "method.layers", layers, "use a positive number of layers")
    if method == "peft_prefix":  # what PEFT's prefix tuning has no switch for
        _require(cfg.prefix.dropout == 0, "prefix.dropout", cfg.prefix.dropout, "PEFT's prefix tuning has no dropout")
        _require(cfg.prefix.shift_positions, "prefix.shift_positions", False, "PEFT's prefix always shifts positions")
    if method == "lora":
        rank = cfg.method.get("rank")
        _require(isinstance(rank, int) and rank >= 1, "method.rank", rank, "use a positive LoRA rank")
    return method


def check_config(cfg: DictConfig) -> PrefixConfig:
    """Validate the options a run depends on; return the prefix config they describe (its kind from the method)."""
    method = _check_method(cfg)
    settings = OmegaConf.to_container(cfg.prefix, resolve=True)
    for option in INIT_OPTIONS:
        settings.pop(option, None)
    settings["kind"] = method if method in KINDS else "prefix"
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
