"""What reaches W&B and TensorBoard beyond Lightning's metric logging: run naming, generation samples, and each run's
result (TensorBoard's hparams view, W&B's run summary), so that sweep runs can be compared side by side."""

from __future__ import annotations

import netrc
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from prefix_lightning.training.job import current_job

SAMPLE_COLUMNS = ("source", "generation", "references")
WANDB_RUN_ID = Path("wandb", "run_id")


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
    """Lightning's W&B logger with group = the sweep's name and run name = the job's folder name (its command-line
    overrides), one W&B run per run folder (``save_dir``): a resumed run continues its W&B run.

    ``offline=None`` logs online only when an API key is configured, so a run never waits at a login prompt nor
    fails for lack of a key (sync offline runs later with `wandb sync`); WANDB_MODE, when set, has the last word.
    """
    job = current_job()
    if offline is None:
        offline = "WANDB_MODE" not in os.environ and not wandb_api_key_configured()
    name = name or (job.name if job else None) or None
    group = group or (job.sweep if job else None)
    if kwargs.get("save_dir") and not kwargs.get("id"):
        kwargs["id"] = wandb_run_id(Path(kwargs["save_dir"]))
    return WandbLogger(offline=offline, name=name, group=group, **kwargs)


def wandb_run_id(run_dir: Path) -> str:
    """The id of the run folder's W&B run: drawn by its first attempt and kept in the folder, so that later attempts
    continue that W&B run (drawn, not derived from the path: sweep folders of the same name on two machines are two
    runs). Other ranks than 0 log nothing, and write nothing."""
    path = run_dir / WANDB_RUN_ID
    if path.is_file():
        return path.read_text().strip()
    drawn = uuid.uuid4().hex[:8]
    if getattr(rank_zero_only, "rank", 0) == 0:  # Lightning sets it from the launcher's environment
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(drawn + "\n")
    return drawn


def continue_dashboards(loggers: Iterable[Logger], step: int) -> None:
    """A resumed attempt logs again from its checkpoint's ``step``; what earlier attempts logged from there on was
    lost with them (it came after that checkpoint). TensorBoard drops those events, as metrics.csv drops those rows;
    W&B keeps them (its points are plotted by ``trainer/global_step``, which repeats). Before anything is logged."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._kwargs["purge_step"] = step  # passed to its SummaryWriter, made at the first log


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
