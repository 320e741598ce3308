"""Checks of a composed config that run before anything is loaded, so a typo costs seconds, not a model load.

The rules live with what they describe (``BackboneConfig``, ``PrefixConfig``, the method classes' signatures);
this module asks them, and adds the rules of a run (learning rate, budgets, decoding).
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.backbones import BackboneConfig
from prefix_lightning.backbones.quantization import quantized_training_error
from prefix_lightning.prefix import PrefixConfig
from prefix_lightning.training.tasks import TaskConfigError, check_tasks


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and what it accepts."""


def _require(condition: bool, option: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r} is not valid: {accepted}")


def _positive_or_null(cfg: DictConfig, option: str) -> None:
    value = OmegaConf.select(cfg, option)
    _require(value is None or (isinstance(value, int) and value > 0), option, value, "use a positive integer or null")


def options_at(cfg: DictConfig, option: str) -> dict[str, Any]:
    """The mapping at ``option`` (e.g. "model.backbone"), resolved into plain keyword arguments."""
    node = OmegaConf.select(cfg, option)
    settings = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(settings, dict):
        raise ConfigError(f"{option} must be a mapping of options, got {settings!r}")
    return {str(name): value for name, value in settings.items()}


def _built(option: str | None, build: Any, settings: dict[str, Any]) -> Any:
    """``build(**settings)``, its refusal as a ConfigError (under ``option`` unless the message names it)."""
    try:
        return build(**settings)
    except (TypeError, ValueError, ImportError) as error:  # ImportError: an optional library the value needs
        raise ConfigError(f"{option}: {error}" if option else str(error)) from error


def method_class(cfg: DictConfig) -> type:
    """The class that ``method.model`` builds; its options must be keywords it takes."""
    target = OmegaConf.select(cfg, "method.model._target_")
    try:
        cls = get_class(target)
    except Exception as error:
        raise ConfigError(f"method.model._target_={target!r} is not a class that can be imported ({error})") from error
    options = set(cfg.method.model) - {"_target_"}
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(options - set(parameters)) if not takes_any else []
    if unknown:
        accepted = sorted(set(parameters) - {"self", "lm", "tokenizer"})
        raise ConfigError(f"method.model: {cls.__name__} takes no option {', '.join(unknown)}; options: {accepted}")
    return cls


def _check_tasks(cfg: DictConfig) -> None:
    """A mixture of tasks (data=multi) and a method that trains one prefix per task go together."""
    tasks = OmegaConf.select(cfg, "data.tasks")
    takes_tasks = "tasks" in inspect.signature(method_class(cfg)).parameters
    if tasks is None and takes_tasks:
        raise ConfigError(
            f"method={cfg.method.name} trains one prefix per task: use it with data=multi data.tasks=[...]"
        )
    if tasks is not None and not takes_tasks:
        raise ConfigError(
            f"data=multi tags every row with its task; method={cfg.method.name} trains one model for all rows: use "
            "method=multitask_prefix (one prefix per task), or a single data config"
        )
    if tasks is not None:
        try:
            check_tasks(tasks)
        except TaskConfigError as error:
            raise ConfigError(str(error)) from error


def check_config(cfg: DictConfig) -> None:
    """Validate the options a run depends on, naming the option and what it accepts."""
    backbone = _built("model.backbone", BackboneConfig, options_at(cfg, "model.backbone"))
    prefix = _built(None, PrefixConfig.of, {"config": options_at(cfg, "prefix")})
    _check_tasks(cfg)
    if backbone.quantization is not None and getattr(method_class(cfg), "trains_lm_weights", False):
        what = f"model.backbone.quantization={backbone.quantization}"
        raise ConfigError(quantized_training_error(f"method {cfg.method.name}", what))
    if (prefix.init_text is not None or prefix.init_vocab) and "config" not in cfg.method.model:
        raise ConfigError(
            f"prefix.init_text / init_vocab start a prefix, infix or embedding; method {cfg.method.name} has none"
        )
    lr = cfg.method.lr
    _require(isinstance(lr, (int, float)) and lr > 0, "method.lr", lr, "the learning rate must be > 0")
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
    _require(cfg.get("export", "best") in ("best", "last"), "export", cfg.get("export"), "use best or last")
    patience = OmegaConf.select(cfg, "callbacks.early_stopping.patience")
    positive = isinstance(patience, int) and not isinstance(patience, bool) and patience > 0
    _require(
        patience is None or positive, "callbacks.early_stopping.patience", patience, "use validations > 0, or null"
    )
    minutes = OmegaConf.select(cfg, "callbacks.last_checkpoint.every_minutes")
    timed = isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes >= 0
    _require(minutes is None or timed, "callbacks.last_checkpoint.every_minutes", minutes, "use minutes >= 0, or null")
