"""``train(cfg)``: one run from a composed config, returning the metric that sweepers optimize."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.files.checkpoints import logged_step
from prefix_lightning.training.build import (
    build_checked_model,
    build_module,
    configured_data,
    encode_for,
    read_data_first,
)
from prefix_lightning.training.callback_lookup import find_callback
from prefix_lightning.training.checks import ConfigError, check_config, check_validation_reached
from prefix_lightning.training.dashboards import continue_dashboards
from prefix_lightning.training.job import current_job, resumable_folder
from prefix_lightning.training.last_checkpoint import LastCheckpoint, RunStopped
from prefix_lightning.training.method_export import MethodExport
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.result_record import ResultRecord
from prefix_lightning.training.resume import check_earlier_attempt, finished_record, resume_checkpoint

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Callbacks and loggers are dicts of named entries so that configs can add or drop one by name; an entry that
    is null, or builds None (a callback switched off by its settings), adds nothing."""
    built = [instantiate(entry) for entry in (group or {}).values() if entry is not None]
    return [thing for thing in built if thing is not None]


def _console_for_rank_zero() -> None:
    """The other processes of a multi-process run (re-launched command lines) share rank 0's console: there they
    keep to errors, so that each line is said once; their whole log is in their own file
    (``train_ddp_process_<rank>.log`` in the run folder)."""
    if getattr(rank_zero_only, "rank", 0) == 0:  # Lightning sets it from the launcher's environment
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # not its subclass FileHandler
            handler.setLevel(logging.ERROR)


def train(cfg: DictConfig) -> float | None:
    """Train, export and test the configured method; return the validation ``cfg.optimized_metric`` of the exported
    weights (for sweepers): the best value with ``export=best``, the last one with ``export=last``.

    A run folder that already holds a complete result record is not run again; one with a last checkpoint resumes
    (for both, settings that change what it computes are refused when they differ from those the run started with).
    """
    _console_for_rank_zero()
    _check_sweep_is_a_multirun(cfg)
    check_earlier_attempt(cfg)
    finished = finished_record(cfg.paths.output_dir)
    if finished is not None:
        return exported_value(finished)
    settle_optimized_metric(cfg)
    check_validation_reached(cfg)
    checkpoint = resume_checkpoint(cfg)  # a damaged one is refused before anything loads
    started = time.perf_counter()
    check_config(cfg)
    datamodule = configured_data(cfg)
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and Lightning would refuse it
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    read_data_first(datamodule, trainer, "fit")  # a data problem is said before the model loads
    model, tokenizer = build_checked_model(cfg)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.lm.parameters())
    log.info("method %s: %s trainable parameters, LM of %s", cfg.method.name, f"{trainable:,}", f"{frozen:,}")
    encode_for(datamodule, cfg, tokenizer, model)
    module = build_module(cfg, model, tokenizer)
    if checkpoint is not None and (step := logged_step(checkpoint)) is not None:
        continue_dashboards(loggers, step)
    export = find_callback(callbacks, MethodExport)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
        if cfg.get("test", True):
            trainer.test(module, datamodule=datamodule)
        elif export is not None and export.source is None:  # resumed at its last step: training was skipped
            log.warning(
                "nothing was exported: the run had finished training when it was resumed, and test=false; export "
                "with: python -m prefix_lightning.export %s %s --overwrite",
                export.best_checkpoint(trainer) or checkpoint,
                export.dirpath,
            )
    except SIGTERMException as stop:  # SIGTERM, SIGUSR1, Ctrl-C: last.ckpt is saved; exit non-zero, saying how to go on
        last = find_callback(callbacks, LastCheckpoint)
        job = current_job()
        raise RunStopped.of(last, resumable_folder(cfg.paths.output_dir), in_sweep=bool(job and job.sweep)) from stop
    log.info("run finished in %.0f s; outputs in %s", time.perf_counter() - started, cfg.paths.output_dir)
    record = find_callback(callbacks, ResultRecord)
    return exported_value({**record.progress, "export": export.source if export else None}) if record else None


def _check_sweep_is_a_multirun(cfg: DictConfig) -> None:
    """A sweep config chosen without ``-m`` would run one job of the defaults, not the sweep. A resumed sweep job
    and the re-launched processes of a multi-process run (``LOCAL_RANK`` set) carry the choice in their command
    lines on purpose."""
    job = current_job()
    sweep = job.choices.get("sweep") if job is not None and job.sweep is None else None
    if sweep is not None and cfg.get("resume") is None and os.environ.get("LOCAL_RANK") is None:
        raise ConfigError(f"+sweep={sweep} is a multirun's settings: run it with -m (python run.py -m +sweep={sweep})")


def exported_value(record: dict[str, Any]) -> float | None:
    """The optimized validation metric of the weights a run exported: the best value when it exported the best
    checkpoint, else the last one."""
    return record["best_val"] if record.get("export") == "best" else record["last_val"]
