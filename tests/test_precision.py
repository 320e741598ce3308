"""Precision choices, gradient accumulation and gradient checkpointing of the frozen LM, trained for real on CPU."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from prefix_lightning.training.build import build_model
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_train

SHORT = ["model=tiny_llama", "debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2"]


def _trained(run_dir: Path) -> tuple[dict, list[float]]:
    """The last checkpoint and the logged training losses of a finished run."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    with open(run_dir / "csv" / "metrics.csv") as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    return checkpoint, losses


@pytest.mark.integration
def test_bf16_mixed_with_gradient_checkpointing_and_accumulation(tmp_path: Path, data_dir: Path) -> None:
    """bf16 autocast on CPU, the LM's layers recomputed in backward, 2 batches per step: a float32 prefix trains."""
    overrides = [*SHORT, "trainer.precision=bf16-mixed", "model.gradient_checkpointing=true"]
    model, _ = build_model(compose_train(tmp_path / "cfg", overrides))
    assert sum("forward" in vars(module) for module in model.lm.modules()) == 2  # both decoder layers wrapped
    run_cli(tmp_path, *overrides, "trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=1")
    checkpoint, losses = _trained(tmp_path)
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert (checkpoint["global_step"], batches) == (2, 4)
    assert all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values())
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "test_metrics.json").is_file()  # decoding ran under autocast too


@pytest.mark.integration
def test_frozen_lm_in_bf16_trains_a_float32_prefix(tmp_path: Path, data_dir: Path) -> None:
    """model.backbone.dtype=bfloat16: the frozen LM computes in bf16, the prefix and AdamW stay float32."""
    overrides = [*SHORT, "model.backbone.dtype=bfloat16"]
    model, _ = build_model(compose_train(tmp_path / "cfg", overrides))
    assert next(model.lm.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    with torch.no_grad():
        start = {f"{g}.{i}": block for g, encoder in model.encoders.items() for i, block in enumerate(encoder())}
    run_cli(tmp_path, *overrides)
    checkpoint, losses = _trained(tmp_path)
    assert checkpoint["global_step"] == 2 and losses and all(math.isfinite(loss) for loss in losses)
    exported = load_file(tmp_path / "prefix" / "prefix.safetensors")
    assert exported.keys() == start.keys() and all(exported[name].dtype == torch.float32 for name in start)
    assert all(not torch.equal(exported[name], start[name]) for name in start), "the prefix must train"


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp_cpu"])
def test_precision_choices_instantiate(trainer: str, precision: str, tmp_path: Path) -> None:
    # GPU configs on the CPU: only the accelerator differs (Lightning falls back from 16-mixed to bf16 on CPU).
    overrides = [f"trainer={trainer}", f"trainer.precision={precision}", "trainer.accelerator=cpu"]
    built = instantiate(compose_train(tmp_path, overrides).trainer)
    assert built.precision == ("bf16-mixed" if precision == "16-mixed" else precision)
