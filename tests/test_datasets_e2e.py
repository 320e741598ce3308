"""Slow: short runs from the command line on every dataset of the paper, scored with its official metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = ["debug=fast", "data.val_size=4"]


def test_webnlg_is_scored_on_seen_unseen_and_all(tmp_path: Path, data_dir: Path) -> None:
    run_cli(tmp_path, "model=tiny_llama", "data=webnlg", "data.metric_suite=webnlg", "data.test_size=null", *TINY)
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    for prefix in ("", "seen/", "unseen/"):
        assert {f"{prefix}BLEU", f"{prefix}METEOR", f"{prefix}TER"} <= metrics.keys()
    assert len((tmp_path / "test_generations.txt").read_text().splitlines()) == 1862


def test_dart_is_scored_with_bleu_meteor_ter(tmp_path: Path, data_dir: Path) -> None:
    run_cli(tmp_path, "model=tiny_gpt2", "data=dart_devsplit", "data.metric_suite=dart", *TINY)
    assert json.loads((tmp_path / "test_metrics.json").read_text()).keys() == {"BLEU", "METEOR", "TER"}


def test_xsum_sample_trains_tiny_bart_and_scores_rouge(tmp_path: Path, data_dir: Path) -> None:
    run_cli(
        tmp_path,
        "model=tiny_bart",
        "data=xsum_sample",
        "generation=summarization",
        "data.metric_suite=xsum",
        "data.max_source_tokens=512",
        *TINY,
        "generation.max_new_tokens=12",
        "generation.min_new_tokens=2",
    )
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    assert metrics.keys() == {"rouge1", "rouge2", "rougeL"}
    checkpoint_keys = (tmp_path / "prefix" / "prefix_config.json").read_text()
    assert all(group in checkpoint_keys for group in ("encoder", "decoder", "cross"))
