"""Checks of a composed config that run before anything is loaded, so a typo costs seconds, not a model load.

The rules live with what they describe (``BackboneConfig``, ``PrefixConfig``, the method classes' signatures);
this module asks them, and adds the rules of a run (learning rate, budgets, decoding).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import types
import typing
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

from prefix_lightning.backbones import BackboneConfig
from prefix_lightning.backbones.quantization import quantized_training_error
from prefix_lightning.numbers import is_int, is_number
from prefix_lightning.prefix import PrefixConfig
from prefix_lightning.training.compose import config_leaves
from prefix_lightning.training.early_stopping import check_patience
from prefix_lightning.training.job import current_job
from prefix_lightning.training.last_checkpoint import check_every_minutes
from prefix_lightning.training.muted import muted
from prefix_lightning.training.tasks import TaskConfigError, check_tasks


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and what it accepts."""


def _require(condition: bool, option: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r} is not valid: {accepted}")


def _switch(cfg: DictConfig, option: str) -> None:
    """An on/off setting is true or false (or absent): Python takes any other word, a typo such as ``flase`` too,
    for true."""
    value = OmegaConf.select(cfg, option)
    _require(value is None or isinstance(value, bool), option, value, "use true or false")


def _positive_or_null(cfg: DictConfig, option: str) -> None:
    value = OmegaConf.select(cfg, option)
    _require(value is None or (is_int(value) and value > 0), option, value, "use a positive integer or null")


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
        with muted("hydra.utils"):  # it logs the error it raises, in three lines
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


def method_options(cfg: DictConfig) -> dict[str, Any]:
    """The keywords ``method.model`` gives its class, resolved (the LM, and the tokenizer where the class takes one,
    are passed when it is built)."""
    options = options_at(cfg, "method.model")
    del options["_target_"]
    return options


# What a scalar annotation of a method's option accepts, in the words of the message that refuses another value.
SCALARS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda value: isinstance(value, bool)),
    int: ("an integer", is_int),
    float: ("a number", is_number),
    str: ("text", lambda value: isinstance(value, str)),
    type(None): ("null", lambda value: value is None),
}


def _check_option_types(cls: type, options: dict[str, Any]) -> None:
    """An option whose parameter is annotated as a switch, a number or text (or null) is checked as it is written:
    ``method.model.dropout=maybe`` reached LoRA as text, which failed in a comparison inside it."""
    try:
        parameters = inspect.signature(cls, eval_str=True).parameters
    except Exception:  # an annotation that cannot be resolved here: the class checks its own values
        return
    for name, value in options.items():
        hint = parameters[name].annotation if name in parameters else None
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        kinds = typing.get_args(hint) if union else (hint,)
        if not kinds or not all(kind in SCALARS for kind in kinds):
            continue  # a structure (a prefix config, a list of modules): the class checks it
        if not any(SCALARS[kind][1](value) for kind in kinds):
            accepted = " or ".join(SCALARS[kind][0] for kind in kinds)
            raise ConfigError(f"method.model.{name}={value!r} is not valid: {cls.__name__} takes {accepted}")


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
        prefixes = OmegaConf.select(cfg, "method.model.tasks")
        if prefixes is not None and list(prefixes) != list(tasks):
            raise ConfigError(
                f"method.model.tasks={list(prefixes)} is not data.tasks={list(tasks)}: the method trains a prefix for "
                "each task of the data; set data.tasks alone"
            )


# What a run reads of a method's config (conf/method/<name>.yaml), beside the class's options under model.
METHOD_SETTINGS = ("name", "model", "lr", "export_dir")
OPTIM_OPTIONS = ("weight_decay", "warmup_steps")  # MethodModule's, besides the method's lr

# Where a run reads its settings one by one (the top level, model, method): one that the command line adds there is
# never read. The other groups take whatever they hold as options, and their own checks refuse an unknown one.
READ_BY_NAME = ("", "model", "method")


def _check_added_settings(cfg: DictConfig) -> None:
    """Refuse a setting that the command line adds (``+name=value``) where nothing reads it: a misspelled setting,
    which Hydra's own hint (append with ``+``) turns into one that is silently ignored. A config group
    (``+sweep=length``) and a key that a config's interpolation reads (``${name}``) are kept."""
    job = current_job()
    if job is None or not job.added:
        return
    unresolved = OmegaConf.to_yaml(cfg)
    for key in job.added:
        read = re.search(r"\$\{(oc\.select:)?" + re.escape(key) + r"\b", unresolved)
        if key.rpartition(".")[0] not in READ_BY_NAME or "/" in key or key in job.choices or read:
            continue
        close = _closest_setting(key, [path for path in config_leaves(cfg) if path not in job.added])
        hint = f"; did you mean {close}=...?" if close else ""
        raise ConfigError(f"+{key}: the run has no setting {key} and no config reads it{hint}")


def _closest_setting(key: str, settings: list[str]) -> str | None:
    """The setting whose name is nearest ``key``'s (``lr`` -> ``method.lr``), in ``key``'s group where two share it."""
    group, _, name = key.rpartition(".")
    paths: dict[str, list[str]] = {}
    for path in settings:
        paths.setdefault(path.rpartition(".")[2], []).append(path)
    nearest = difflib.get_close_matches(name, paths, n=1)
    if not nearest:
        return None
    candidates = paths[nearest[0]]
    return next((path for path in candidates if path.rpartition(".")[0] == group), candidates[0])


def check_config(cfg: DictConfig) -> None:
    """Validate the options a run depends on, naming the option and what it accepts."""
    _check_added_settings(cfg)
    _check_model_and_method(cfg)
    _check_optim(cfg)
    check_decoding_options(cfg)
    _check_data(cfg)
    _check_budget(cfg)
    _check_trainer(cfg)
    _require(cfg.get("export", "best") in ("best", "last"), "export", cfg.get("export"), "use best or last")
    _built(None, check_patience, {"patience": OmegaConf.select(cfg, "callbacks.early_stopping.patience")})
    minutes = OmegaConf.select(cfg, "callbacks.last_checkpoint.every_minutes")
    _built(None, check_every_minutes, {"every_minutes": minutes})


def _check_model_and_method(cfg: DictConfig) -> None:
    method = options_at(cfg, "method")
    missing = [key for key in METHOD_SETTINGS if key not in method]
    if missing:
        raise ConfigError(
            f"method: the method's config lacks {', '.join(missing)}; a method config gives its name, its class and "
            "options (model: _target_ and keywords), its learning rate (lr) and its export folder (export_dir), as "
            "conf/method/prefix.yaml does"
        )
    cls = method_class(cfg)
    _check_option_types(cls, method_options(cfg))
    backbone = _built("model.backbone", BackboneConfig, options_at(cfg, "model.backbone"))
    prefix = _built(None, PrefixConfig.of, {"config": options_at(cfg, "prefix")})
    _check_tasks(cfg)
    if backbone.quantization is not None and getattr(cls, "trains_lm_weights", False):
        what = f"model.backbone.quantization={backbone.quantization}"
        raise ConfigError(quantized_training_error(f"method {cfg.method.name}", what))
    if (prefix.init_text is not None or prefix.init_vocab) and "config" not in cfg.method.model:
        raise ConfigError(
            f"prefix.init_text / init_vocab start a prefix, infix or embedding; method {cfg.method.name} has none"
        )
    if cfg.model.get("compile") and cfg.model.get("gradient_checkpointing"):
        raise ConfigError(
            "model.compile with model.gradient_checkpointing=true: the checkpointed blocks would run eager (the "
            "compiled call does not reach inside the checkpoint): keep one of the two"
        )
    _switch(cfg, "model.gradient_checkpointing")


def _check_optim(cfg: DictConfig) -> None:
    lr = cfg.method.lr
    _require(is_number(lr) and lr > 0, "method.lr", lr, "the learning rate must be > 0")
    unknown = sorted(set(cfg.get("optim") or {}) - set(OPTIM_OPTIONS))
    if unknown:  # MethodModule would refuse it only once the model has loaded
        raise ConfigError(
            f"optim has no option {', '.join(unknown)}: its options are {', '.join(OPTIM_OPTIONS)} (the learning "
            "rate is method.lr)"
        )
    for option in OPTIM_OPTIONS:
        value = OmegaConf.select(cfg, f"optim.{option}")
        _require(is_number(value) and value >= 0, f"optim.{option}", value, "use a value >= 0")


def _check_data(cfg: DictConfig) -> None:
    subset_seed = OmegaConf.select(cfg, "data.subset_seed")
    mixture = OmegaConf.select(cfg, "data.tasks") is not None  # null there: each task keeps its own
    _require(
        is_int(subset_seed) or (mixture and subset_seed is None), "data.subset_seed", subset_seed, "use an integer"
    )
    for option in ("test", "data.download", "data.group_by_length"):
        _switch(cfg, option)
    for option in ("data.train_size", "data.val_size", "data.test_size", "data.batch_size", "data.eval_batch_size"):
        _positive_or_null(cfg, option)
    workers = cfg.data.get("num_workers", 0)
    _require(is_int(workers) and workers >= 0, "data.num_workers", workers, "use 0 (the main process) or more")


def _check_budget(cfg: DictConfig) -> None:
    """The run's length in steps or epochs, its warm-up and its validation interval."""
    steps = cfg.trainer.get("max_steps", -1)
    _require(
        is_int(steps) and (steps == -1 or steps > 0),
        "trainer.max_steps",
        steps,
        "use a positive number of steps, or -1 for epochs",
    )
    warmup = OmegaConf.select(cfg, "optim.warmup_steps")
    _require(
        steps == -1 or warmup < steps,
        "optim.warmup_steps",
        warmup,
        f"warm up over fewer steps than trainer.max_steps={steps}, or the learning rate never reaches method.lr",
    )
    if steps == -1:
        epochs = cfg.trainer.get("max_epochs", -1)
        _require(
            is_int(epochs) and epochs > 0,
            "trainer.max_epochs",
            epochs,
            "with trainer.max_steps=-1 the run trains by epochs: use a positive number of epochs",
        )
    _positive_or_null(cfg, "trainer.check_val_every_n_epoch")  # Lightning divides by it
    interval = cfg.trainer.get("val_check_interval")
    by_epoch = cfg.trainer.get("check_val_every_n_epoch") is not None  # Lightning takes fractions of epochs only then
    fraction = isinstance(interval, float) and 0 < interval <= 1 and by_epoch
    _require(
        interval is None or (is_int(interval) and interval > 0) or fraction,
        "trainer.val_check_interval",
        interval,
        "use a number of training batches > 0, a fraction of an epoch (0 < x <= 1.0, with "
        "trainer.check_val_every_n_epoch=1), or null (once an epoch)",
    )
    accumulated = cfg.trainer.get("accumulate_grad_batches", 1)
    _require(is_int(accumulated) and accumulated >= 1, "trainer.accumulate_grad_batches", accumulated, "use 1 or more")


def _check_trainer(cfg: DictConfig) -> None:
    """The devices, precision and numerics of the run."""
    accelerator = cfg.trainer.get("accelerator", "cpu")
    _check_precision(str(cfg.trainer.get("precision", "32-true")), accelerator)
    if accelerator in ("gpu", "cuda") and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu, ddp, fsdp, deepspeed_*, slurm), but torch "
            f"{torch.__version__} sees no GPU on this machine: train on the CPU (the default trainer, or "
            "trainer=ddp_cpu), or install a CUDA build of torch"
        )
    deterministic = OmegaConf.select(cfg, "trainer.deterministic")  # Lightning half-applies any other word
    _require(
        deterministic is None or isinstance(deterministic, bool) or deterministic == "warn",
        "trainer.deterministic",
        deterministic,
        "use true, false or warn",
    )
    clip = cfg.trainer.get("gradient_clip_val")
    # Lightning skips a value <= 0, but FSDP's clip_grad_norm_ (training/sharded.py) scales by it: a negative one
    # would turn every step's gradient around.
    clipped = is_number(clip) and clip >= 0
    _require(clip is None or clipped, "trainer.gradient_clip_val", clip, "use a norm > 0, or 0 or null: no clipping")


def check_validation_reached(cfg: DictConfig) -> None:
    """A budget in steps reaches the validation interval, before anything loads (the training's own rule:
    ``evaluate`` and ``export`` read the configs of runs made before it)."""
    trainer = cfg.trainer
    steps, accumulated = trainer.get("max_steps", -1), trainer.get("accumulate_grad_batches", 1)
    interval = trainer.get("val_check_interval")
    counted = all(is_int(value) and value > 0 for value in (steps, accumulated, interval))
    if not counted or trainer.get("check_val_every_n_epoch") is not None:
        return  # by epochs, validated at an epoch's end, or a value check_config refuses
    require_validation_within(interval, steps * accumulated, "trainer.max_steps x trainer.accumulate_grad_batches")


def require_validation_within(interval: int, batches: int, budget: str) -> None:
    """Lightning counts a validation interval in batches across epochs and never validates a run that stops short
    of it: no best checkpoint to export, nothing for a sweeper to optimize (Optuna fails the trial on the None that
    ``train`` returns). Steps are checked with the config; epochs once the batches of one are known."""
    _require(
        interval <= batches,
        "trainer.val_check_interval",
        interval,
        f"the run trains {batches} batches ({budget}) and would never validate: use at most {batches}",
    )


def check_decoding_options(cfg: DictConfig) -> None:
    """The options that decoding reads, shared by training and ``generate`` (which reads nothing else of a run)."""
    _check_seed(cfg)
    _check_prompt_format(cfg)
    _check_generation(cfg)  # first: generate's target budget is the tokens decoded
    _check_token_budgets(cfg)


def _check_prompt_format(cfg: DictConfig) -> None:
    """``model.separator`` and ``model.target_end``, before any model loads (the tokenizer's own error on a number
    or null names neither)."""
    separator, end = cfg.model.get("separator"), cfg.model.get("target_end")
    _require(isinstance(separator, str), "model.separator", separator, "use text (empty for encoder-decoders)")
    _require(isinstance(end, str) and end != "", "model.target_end", end, "use the token that ends a target")


def _check_seed(cfg: DictConfig) -> None:
    """``seed``, before any model loads, within numpy's bounds (which Lightning's seed_everything enforces once the
    run has started, naming no option)."""
    seed = cfg.get("seed")
    _require(is_int(seed) and 0 <= seed < 2**32, "seed", seed, "use an integer from 0 to 2**32 - 1")


def _check_token_budgets(cfg: DictConfig) -> None:
    """``data.max_source_tokens`` / ``max_target_tokens``, where given, before any model loads (a string failed a
    comparison once the model had loaded)."""
    for name in ("max_source_tokens", "max_target_tokens"):
        if name in cfg.data:
            _require(is_int(cfg.data[name]) and cfg.data[name] > 0, f"data.{name}", cfg.data[name], "use tokens > 0")


# Lightning's "true" precisions other than 32 cast the trainable prefix and its AdamW state too (and beam search's
# float32 scores then meet bf16/float64 logits); "16" and "bf16" are Lightning's old names of the mixed ones.
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")


def _check_precision(precision: str, accelerator: str) -> None:
    _require(
        precision in PRECISIONS,
        "trainer.precision",
        precision,
        "use 32-true (the default), bf16-mixed, or 16-mixed (GPUs); to hold the frozen LM in bf16 add "
        "model.backbone.dtype=bfloat16 (the prefix and its optimizer stay float32)",
    )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision in ("16-mixed", "16") and on_cpu:
        raise ConfigError(
            f"trainer.precision={precision} is for GPUs (on the CPU Lightning would run bf16-mixed instead): use "
            "bf16-mixed or 32-true"
        )


def _check_generation(cfg: DictConfig) -> None:
    """The decoding options, before any model loads: a typo would stop a run at its first validation, after its
    training steps, in transformers' words (or not at all: transformers ignores what it does not know)."""
    settings = {name: value for name, value in options_at(cfg, "generation").items() if value is not None}
    unknown = sorted(set(settings) - _decoding_options())
    if unknown:
        raise ConfigError(
            f"generation has no option {', '.join(unknown)}: use transformers' GenerationConfig fields "
            "(num_beams, max_new_tokens, length_penalty, ...) or ban_newline"
        )
    for option in ("do_sample", "ban_newline"):
        _switch(cfg, f"generation.{option}")
    beams = settings.get("num_beams", 1)
    _require(is_int(beams) and beams >= 1, "generation.num_beams", beams, "use 1 (greedy) or more beams")
    returned = settings.get("num_return_sequences", 1)
    _require(
        returned == 1,
        "generation.num_return_sequences",
        returned,
        "runs, generate and evaluate keep one output per input",
    )
    # null alone would leave transformers' default max_length of 20 tokens, prompt included, without a word.
    tokens: Any = settings.get("max_new_tokens", 1 if "max_length" in settings else None)
    _require(
        is_int(tokens) and tokens >= 1,
        "generation.max_new_tokens",
        tokens,
        "use a positive integer (null only with +generation.max_length)",
    )
    for option in ("min_new_tokens", "no_repeat_ngram_size"):
        value = settings.get(option, 0)
        _require(is_int(value) and value >= 0, f"generation.{option}", value, "use an integer >= 0 (0: off)")
    penalty = settings.get("length_penalty", 1.0)
    _require(is_number(penalty), "generation.length_penalty", penalty, "use a number (> 0 favours longer outputs)")
    stopping = settings.get("early_stopping", False)
    _require(stopping in (True, False, "never"), "generation.early_stopping", stopping, "use true, false or never")
    _check_processor_ranges(settings)


def _check_processor_ranges(settings: dict[str, Any]) -> None:
    """The ranges transformers' logits processors check only when ``generate`` builds them (a run's first
    validation, after its training steps); the sampling ones only with sampling, where generate applies them."""
    for option in ("repetition_penalty", "encoder_repetition_penalty"):
        value = settings.get(option, 1.0)
        _require(is_number(value) and value > 0, f"generation.{option}", value, "use a number > 0 (1: off)")
    if settings.get("do_sample") is not True:
        return
    temperature = settings.get("temperature", 1.0)
    _require(is_number(temperature) and temperature > 0, "generation.temperature", temperature, "use a number > 0")
    top_k = settings.get("top_k", 0)
    _require(is_int(top_k) and top_k >= 0, "generation.top_k", top_k, "use an integer >= 0 (0: off)")
    for option in ("top_p", "min_p"):
        value = settings.get(option, 1.0)
        _require(is_number(value) and 0 <= value <= 1, f"generation.{option}", value, "use a number from 0 to 1")
    typical = settings.get("typical_p", 1.0)
    _require(is_number(typical) and 0 < typical <= 1, "generation.typical_p", typical, "use a number > 0, up to 1")


@functools.cache
def _decoding_options() -> frozenset[str]:
    return frozenset(GenerationConfig().to_dict()) | {"ban_newline"}  # ban_newline: the project's own
