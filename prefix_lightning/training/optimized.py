"""The validation metric a run optimizes: it picks the best checkpoint, drives early stopping and is what train()
returns to sweepers. Left null in the config, it is the dataset's own (BLEU for table-to-text, ROUGE-L for XSum); for
a mixture of tasks (data=multi) the tasks' common one, averaged over the tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prefix_lightning.data.registry import DATASETS
from prefix_lightning.evaluation import main_validation_metric, task_validation_metrics, validation_metrics
from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.tasks import TaskConfigError, task_data_configs


def settle_optimized_metric(cfg: DictConfig) -> None:
    """Fill ``optimized_metric`` and ``optimized_mode`` where they are null, and refuse a metric that validation
    does not log for this dataset (it would only fail at the first validation)."""
    main: str | None
    if OmegaConf.select(cfg, "data.tasks") is None:
        suite = _suite(cfg.data, cfg.data.get("metric_suite"))
        logged, main = validation_metrics(suite), main_validation_metric(suite)
        validated = str(cfg.data.dataset)
    else:
        try:
            tasks = task_data_configs(cfg)
        except TaskConfigError as error:
            raise ConfigError(str(error)) from error
        suites = {task: _suite(fields, cfg.data.get("metric_suite")) for task, fields in tasks.items()}
        logged, main = task_validation_metrics(suites)
        validated = ", ".join(tasks)
    metric = cfg.optimized_metric or main
    if metric is None:
        raise ConfigError(
            f"optimized_metric=null is not valid here: the tasks {validated} are validated by different metrics; "
            f"name one of {', '.join(logged)}"
        )
    if metric not in logged:
        raise ConfigError(
            f"optimized_metric={metric!r} is not valid: validation on {validated} logs {', '.join(logged)}"
        )
    mode = cfg.optimized_mode or logged[metric]
    if mode != logged[metric]:  # the opposite would keep the worst checkpoint
        raise ConfigError(
            f"optimized_mode={mode!r} is not valid: {metric} is best at its {logged[metric]}imum; give "
            f"optimized_mode={logged[metric]} or null"
        )
    _check_sweeper_direction(metric, mode)
    cfg.optimized_metric, cfg.optimized_mode = metric, mode


def _check_sweeper_direction(metric: str, mode: str) -> None:
    """A search sweeper (Optuna) that maximizes a metric that is best at its minimum would pick the worst trial."""
    direction = HydraConfig.get().sweeper.get("direction") if HydraConfig.initialized() else None
    wanted = "maximize" if mode == "max" else "minimize"
    if direction is not None and str(direction) != wanted:
        raise ConfigError(
            f"hydra.sweeper.direction={direction}, but {metric} is best at its {mode}imum: give "
            f"hydra.sweeper.direction={wanted}"
        )


def _suite(data: Mapping[str, Any], metric_suite: str | None) -> str:
    """The test suite of one dataset's data config: ``metric_suite`` where set, else the dataset's own."""
    dataset = data["dataset"]
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset={dataset!r} is not valid: choose one of {sorted(DATASETS)}")
    return metric_suite or data.get("metric_suite") or DATASETS[dataset].metric_suite
