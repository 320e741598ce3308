"""Score any method's export, or the plain LM, on the configured test split without training.

    python -m prefix_lightning.evaluate export_path=outputs/train/<run>/prefix    # a trained prefix
    python -m prefix_lightning.evaluate export_path=outputs/train/<run>/adapter   # LoRA / PEFT prefix; model/, layers/
    python -m prefix_lightning.evaluate                                           # the un-tuned LM, same prompts

The export folder says which method wrote it and that method's class loads it (``load_export``). An export inside
a run folder is evaluated with that run's own settings (the overrides it started with,
``.hydra/started_overrides.yaml``, then the ones given here); otherwise pass the same config groups as the run
(data, generation, ...; a prefix picks the model config of the base model it records). A multi-task run's
``prefix`` folder is evaluated on every task; one task's folder in it (``prefix/<task>``), on that task's data
alone. Writes test generations and metrics into its own output folder. ``prefix_path`` is the older name of
``export_path``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.cli import report_errors
from prefix_lightning.methods.exports import export_loader
from prefix_lightning.prefix import PrefixModel
from prefix_lightning.prefix.export import CONFIG_NAME
from prefix_lightning.prefix.multitask import task_folders
from prefix_lightning.training.build import (
    build_module,
    configured_data,
    encode_for,
    load_configured_backbone,
    read_data_first,
)
from prefix_lightning.training.checks import ConfigError, check_config
from prefix_lightning.training.compose import check_group_choices, model_config_for
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.resume import (
    composing_with_new_choices,
    exporting_run,
    override,
    override_key,
    run_config,
    run_export,
    run_overrides,
    split_hydra_flags,
    unquoted,
)

log = logging.getLogger(__name__)

EXPORT_KEYS = ("export_path=", "prefix_path=")
# Config groups an export decides itself (its files say which method wrote it and with what prefix).
FIXED_BY_EXPORT = ("method", "prefix")
# What a mixture of tasks (data=multi) sets for the batches of all its tasks.
MIXED_BATCH_SETTINGS = ("max_source_tokens", "max_target_tokens", "eval_batch_size")


def evaluate(cfg: DictConfig) -> float | None:
    """The test's main metric (the one a run optimizes: BLEU, ROUGE-L for XSum, the tasks' mean BLEU for several) of
    the export at ``cfg.export_path`` on ``cfg.model``'s backbone, or of the plain LM when no export is given."""
    check_config(cfg)
    settle_optimized_metric(cfg)
    path = cfg.get("export_path") or cfg.get("prefix_path")
    load = export_loader(path) if path else None  # a wrong folder is refused before the model loads
    if path:
        _check_tasks_match(Path(path), OmegaConf.select(cfg, "data.tasks"))
    datamodule = configured_data(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    read_data_first(datamodule, trainer, "test")  # a data problem is said before the model loads
    lm, tokenizer = load_configured_backbone(cfg)
    if load is not None:
        model = load(lm, path).eval()
        log.info("evaluating the %s export in %s", type(model).__name__, path)
    else:
        model = PrefixModel(lm, length=1)
        log.info("no export_path given: evaluating the plain LM on the same prompts")
    module = build_module(cfg, model, tokenizer)
    encode_for(datamodule, cfg, tokenizer, model)
    with nullcontext() if path else model.prefix_disabled():
        (metrics,) = trainer.test(module, datamodule=datamodule)
    return metrics.get(cfg.optimized_metric.replace("val/", "test/", 1))  # none for val/loss: the test scores outputs


def _check_tasks_match(export: Path, tasks: Sequence[str] | None) -> None:
    """A multi-task export is scored on a mixture of its tasks, one prefix on one dataset: said before anything
    loads (a mismatch failed at the first test batch, deep in decoding)."""
    held = [folder.name for folder in task_folders(export)]
    if held and tasks is None:
        raise ConfigError(
            f"{export} holds one prefix per task ({', '.join(held)}): score it with data=multi "
            f"data.tasks=[{','.join(held)}], or one task's prefix with export_path={export}/<task>"
        )
    if not held and tasks is not None:
        raise ConfigError(f"{export} holds no prefix per task: score it on one dataset (data=<name>), not data=multi")
    missing = [task for task in tasks or () if task not in held]
    if missing:
        raise ConfigError(
            f"data.tasks names {', '.join(missing)}, which {export} holds no prefix for (it has {', '.join(held)})"
        )


def with_run_settings(argv: Sequence[str]) -> list[str]:
    """``argv`` with the overrides of the run whose folder holds the given export put first (the ones given win),
    and the export's path quoted for Hydra (sweep job folders hold ``=`` and ``,``). A run's folder stands for its
    export."""
    given = [argument.partition("=") for argument in argv[1:] if argument.startswith(EXPORT_KEYS)]
    if not given:
        return list(argv)
    if len({Path(unquoted(value)) for _, _, value in given}) > 1:
        raise ConfigError(f"{' and '.join(''.join(item) for item in given)}: give one export to evaluate")
    key, _, value = given[-1]
    export = run_export(unquoted(value))
    rest, flags = split_hydra_flags([argument for argument in argv[1:] if not argument.startswith(EXPORT_KEYS)])
    ignored = [argument for argument in rest if _group(argument) in FIXED_BY_EXPORT]
    if ignored:
        print(f"ignoring {' '.join(ignored)}: the export in {export} says its method and prefix", file=sys.stderr)
        rest = [argument for argument in rest if argument not in ignored]
    overrides: list[str] = []
    exported_by = exporting_run(export)
    if exported_by:
        run, task = exported_by
        overrides = _one_task_of(run, task) if task else run_overrides(run)
        # Where the run wrote is not how it computed: this evaluation writes into its own folder, never over the run's
        # test outputs.
        overrides = [item for item in overrides if override_key(item) != "paths.output_dir"]
        overrides = composing_with_new_choices(run, overrides, rest, "evaluate")
        if overrides:
            print(f"evaluating with the settings of the run in {run}: {' '.join(overrides)}", file=sys.stderr)
    else:
        print(
            f"{export} is not in its run's folder: evaluating with the settings given (data, decoding), not its run's",
            file=sys.stderr,
        )
    if not overrides and "model" not in map(override_key, rest):
        overrides = _recorded_model(export)
    return [argv[0], *overrides, *rest, override(key, export), *flags]


def _recorded_model(export: Path) -> list[str]:
    """``model=<name>`` for a prefix export outside its run folder: the config of the base model it records; where
    none or several match, the error asks for ``model=``."""
    prefixes = task_folders(export) or [export]
    if not all((folder / CONFIG_NAME).is_file() for folder in prefixes):
        return []  # another method's export: the configured model
    name = model_config_for(prefixes)
    print(f"evaluating on model={name}, the base model the export records", file=sys.stderr)
    return [f"model={name}"]


def _group(argument: str) -> str:
    """The config group an override sets (``prefix`` for ``+prefix.length=5``)."""
    return override_key(argument).partition(".")[0]


def _one_task_of(run: Path, task: str) -> list[str]:
    """A multi-task run's settings for one of its tasks: its overrides without those that mixed the tasks and chose
    the mixture's metric (each task is a data config of its own name, with its own metric; the ``data.*`` values a
    mixture sets for every task still apply), and the mixture's token budgets and test batch size, which every
    task's batches had in the run."""
    mixture = {"data", "data.tasks", "method", "optimized_metric", "optimized_mode"}
    kept = [item for item in run_overrides(run) if override_key(item) not in mixture]
    data = run_config(run).data
    return [*kept, f"data={task}", *(f"data.{key}={data[key]}" for key in MIXED_BATCH_SETTINGS)]


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return report_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    report_errors(lambda: check_group_choices(sys.argv[1:]))
    sys.argv = report_errors(lambda: with_run_settings(sys.argv))
    main()
