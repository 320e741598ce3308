"""The result record: one JSON file per run that says what was run and what came out.

A run folder holding a complete record is finished: sweeps skip it when re-run, and aggregation reads only records.
Fields (paths are relative to the run folder, so a sweep folder can be moved or copied from a cluster):

    run                 the job's name in its sweep (Hydra's override dirname; "" for a run without overrides)
    overrides           {key: value} of the job's command-line and sweeper overrides (the swept values)
    choices             the config group choices (model, prefix, data, ...)
    seed, subset_seed   the training seed and the seed that drew the training subset
    train_size, prefix_length
    trainable_params    parameters the method trained (a prefix: with its MLP while training)
    optimized_metric    the validation metric train() returns, e.g. "val/bleu"
    best_val, best_val_step, last_val
    test                {metric: value} of the test, e.g. {"test/bleu": 31.2}; {} when the run does not test
    train_steps, train_tokens, train_time_s, tokens_per_s   (time and tokens of training steps only)
    wall_time_s         from the trainer's start to the record, summed over resumed segments
    checkpoint, best_checkpoint   last.ckpt, and the best validation checkpoint kept
    prefix              the export folder of any method (prefix/, adapter/, layers/, model/)
    export, exported_step   which weights were exported and tested ("best" validation checkpoint or "last" step's)
                        and their training step (records written before these existed lack them)
    finished            UTC time the record was written
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefix_lightning.files.atomic import atomic_write
from prefix_lightning.numbers import is_number

log = logging.getLogger(__name__)

RECORD_FILE = "result.json"
FIELDS = (
    "run",
    "overrides",
    "choices",
    "seed",
    "subset_seed",
    "train_size",
    "prefix_length",
    "trainable_params",
    "optimized_metric",
    "best_val",
    "best_val_step",
    "last_val",
    "test",
    "train_steps",
    "train_tokens",
    "train_time_s",
    "tokens_per_s",
    "wall_time_s",
    "checkpoint",
    "best_checkpoint",
    "prefix",
    "export",
    "exported_step",
    "finished",
)
LATER_FIELDS = ("export", "exported_step")  # a record without them is complete: it predates them
MAPPINGS = ("overrides", "choices", "test")
NUMBERS = ("best_val", "trainable_params", "tokens_per_s", "wall_time_s")  # each a number, or null


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write atomically: a run killed while writing leaves no record (and is re-run), never half of one."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise ValueError(f"result record lacks {missing}")
    path = Path(run_dir) / RECORD_FILE
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(record, indent=2) + "\n"))
    return path


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's record if it is complete, else None (no record, an unreadable one, or one missing fields)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("ignoring the unreadable result record %s: %s", path, error)
        return None
    if not isinstance(record, dict) or any(name not in record for name in FIELDS if name not in LATER_FIELDS):
        log.warning("ignoring the incomplete result record %s", path)
        return None
    problem = _malformed(record)
    if problem:
        log.warning("ignoring the malformed result record %s: %s", path, problem)
        return None
    return record


def _malformed(record: dict[str, Any]) -> str | None:
    """What in a complete record readers could not compute with (a hand-edited file), else None: they would stop
    at it with a message that names neither the file nor the field."""
    for name in MAPPINGS:
        if not isinstance(record[name], dict):
            return f"`{name}` is not an object"
    if not isinstance(record["optimized_metric"], str):
        return "`optimized_metric` is not a string"
    for name, value in [*((name, record[name]) for name in NUMBERS), *record["test"].items()]:
        if value is not None and not is_number(value):
            return f"`{name}` is not a number"
    return None
