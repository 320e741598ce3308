"""Result records made up for tests of the sweep tools (aggregation, paired comparison), and a sweep folder of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefix_lightning.training.record import FIELDS, write_record


def make_record(overrides: dict[str, Any], bleu: float, seed: int = 1) -> dict[str, Any]:
    """A complete record of a finished run with these overrides and test BLEU (its other numbers fixed)."""
    record = dict.fromkeys(FIELDS)
    record.update(
        run=",".join(f"{key}={value}" for key, value in sorted(overrides.items())),
        overrides=overrides,
        choices={"model": "tiny_llama"},
        seed=seed,
        subset_seed=overrides.get("data.subset_seed", 0),
        optimized_metric="val/bleu",
        best_val=bleu + 1.0,
        last_val=bleu + 0.5,
        test={"test/bleu": bleu},
        trainable_params=1000,
        train_steps=4,
        tokens_per_s=500.0,
        wall_time_s=10.0,
        finished="2026-01-01T00:00:00+00:00",
    )
    return record


def write_sweep(sweep: Path, records: list[dict[str, Any]]) -> None:
    """Each record in a job folder named by its overrides, as a multirun leaves them."""
    for record in records:
        write_record(sweep / record["run"], record)
