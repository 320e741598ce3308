"""The validation metric a run optimizes: it picks the best checkpoint, drives early stopping and is what train()
returns to sweepers. Left null in the config, it is the dataset's own (BLEU for table-to-text, ROUGE-L for XSum)."""

from __future__ import annotations

from omegaconf import DictConfig

from prefix_lightning.data.registry import DATASETS
from prefix_lightning.evaluation import main_validation_metric, validation_metrics
from prefix_lightning.training.checks import ConfigError

MODES = ("max", "min")


def settle_optimized_metric(cfg: DictConfig) -> None:
    """Fill ``optimized_metric`` and ``optimized_mode`` where they are null, and refuse a metric that validation
    does not log for this dataset (it would only fail at the first validation)."""
    dataset = cfg.data.dataset
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset={dataset!r} is not valid: choose one of {sorted(DATASETS)}")
    suite = cfg.data.get("metric_suite") or DATASETS[dataset].metric_suite
    logged = validation_metrics(suite)
    metric = cfg.optimized_metric or main_validation_metric(suite)
    if metric not in logged:
        raise ConfigError(f"optimized_metric={metric!r} is not valid: validation on {dataset} logs {', '.join(logged)}")
    mode = cfg.optimized_mode or logged[metric]
    if mode not in MODES:
        raise ConfigError(f"optimized_mode={mode!r} is not valid: use max, min or null ({metric}: {logged[metric]})")
    cfg.optimized_metric, cfg.optimized_mode = metric, mode
