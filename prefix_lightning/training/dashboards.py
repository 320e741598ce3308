"""What reaches W&B and TensorBoard beyond Lightning's metric logging: run naming, generation samples, and each run's
result (TensorBoard's hparams view, W&B's run summary), so that sweep runs can be compared side by side."""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from prefix_lightning.training.job import current_job

SAMPLE_COLUMNS = ("source", "generation", "references")


def wandb_api_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(
    offline: bool | None = None, name: str | None = None, group: str | None = None, **kwargs: Any
) -> WandbLogger:
    """Lightning's W&B logger with group = the sweep's name and run name = the job's swept values.

    ``offline=None`` logs online only when an API key is configured, so a run never waits at a login prompt nor
    fails for lack of a key (sync offline runs later with `wandb sync`); WANDB_MODE, when set, has the last word.
    """
    job = current_job()
    if offline is None:
        offline = "WANDB_MODE" not in os.environ and not wandb_api_key_configured()
    name = name or (job.name if job else None) or None
    group = group or (job.sweep if job else None)
    return WandbLogger(offline=offline, name=name, group=group, **kwargs)


def log_generation_samples(loggers: Iterable[Logger], key: str, rows: Sequence[dict[str, Any]], step: int) -> None:
    """Generations next to their sources and references: a W&B table, a TensorBoard text panel."""
    cells = [[row["source"], row["generation"], "\n".join(row["references"])] for row in rows]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(SAMPLE_COLUMNS), data=cells, step=step)
        elif isinstance(logger, TensorBoardLogger):
            text = "\n\n".join(
                f"**source:** {source}  \n**generation:** {generation}  \n**references:** {references}"
                for source, generation, references in cells
            )
            logger.experiment.add_text(key, text, global_step=step)


def log_result(loggers: Iterable[Logger], record: dict[str, Any]) -> None:
    """A finished run's settings and results: TensorBoard's hparams view (one row per run), W&B's run summary."""
    settings = {
        **record["overrides"],
        **{name: record.get(name) for name in ("seed", "subset_seed", "train_size", "prefix_length")},
    }
    results = {
        f"result/{record['optimized_metric']}_best": record["best_val"],
        "result/tokens_per_s": record["tokens_per_s"],
    }
    results.update({f"result/{name}": value for name, value in record["test"].items()})
    results = {name: value for name, value in results.items() if value is not None}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(settings, metrics=results, step=record["train_steps"])
        elif isinstance(logger, WandbLogger):
            logger.experiment.summary.update(results)
