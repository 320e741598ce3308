"""E2E data modules on the shipped files alone (devset.csv split into training and held-out validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefix_lightning.data.datamodule import TextToTextDataModule

GPT2_LAYOUT = {"separator": " <|endoftext|>", "target_end": "<|endoftext|>"}


def offline_datamodule(tokenizer: Any, data_dir: Path, **overrides: Any) -> TextToTextDataModule:
    """200 training pairs, 50 validation and 30 test groups from devset.csv, nothing downloaded; ``overrides``
    change any argument."""
    settings = {
        "train_file": "devset.csv",
        "val_file": "devset.csv",
        "val_size": 50,
        "test_size": 30,
        "train_size": 200,
        "download": False,
        **GPT2_LAYOUT,
    }
    return TextToTextDataModule(tokenizer, data_dir, "e2e", **{**settings, **overrides})


def rows_and_padded_tokens(batches: list[dict[str, Any]]) -> tuple[list[tuple[int, ...]], int]:
    """Every row's tokens without its padding, sorted, and how many tokens the batches pad to in all."""
    rows = [
        tuple(row[mask.bool()].tolist())
        for batch in batches
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    return sorted(rows), sum(batch["input_ids"].numel() for batch in batches)
