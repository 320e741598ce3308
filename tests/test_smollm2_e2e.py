"""Slow: a real prefix on the real SmolLM2-135M, trained briefly on E2E from the data folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers.cli import run_cli
from tests.helpers.quantized import needs_bitsandbytes

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The real model on one busy core takes over 10 minutes here (about 3 on two quiet cores); pytest's slow-test
# limit (tests/conftest.py) stays the outer bound.
SLOW_COMMAND_TIMEOUT_S = 1500


# The LM in float32, or in int8 (bitsandbytes LLM.int8()) under the same float32 prefix.
@pytest.mark.parametrize("quantization", ["null", pytest.param("int8", marks=needs_bitsandbytes)])
def test_prefix_on_smollm2_lowers_validation_loss_and_scores_bleu(
    quantization: str, tmp_path: Path, data_dir: Path
) -> None:
    run_cli(
        tmp_path,
        f"model.backbone.quantization={quantization}",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "data.train_size=300",
        "data.val_size=5",
        "data.test_size=10",
        "generation.num_beams=2",
        "generation.max_new_tokens=40",
        "callbacks.progress_bar.refresh_rate=0",
        timeout=SLOW_COMMAND_TIMEOUT_S,
    )
    with open(tmp_path / "csv" / "metrics.csv") as file:
        losses = [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")]
    assert len(losses) == 3
    assert losses[-1] < losses[0], f"validation loss did not fall: {losses}"
    bleu = json.loads((tmp_path / "test_metrics.json").read_text())["BLEU"]
    assert bleu > 10.0, f"test BLEU {bleu:.2f} after 30 steps"
    assert (tmp_path / "prefix" / "prefix.safetensors").stat().st_size < 1_000_000
