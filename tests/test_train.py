"""End to end from the command line: a tiny model trains, checkpoints only its prefix, exports, resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import FAST, run_cli
from tests.helpers.config import compose_train

pytestmark = pytest.mark.integration

FULL_SCORING = [*FAST, "data.metric_suite=e2e"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run_cli(run_dir, *FULL_SCORING)
    return run_dir


def test_checkpoint_holds_only_the_prefix_and_training_state(trained_run: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"], "the prefix must be saved"
    assert all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])
    assert checkpoint["global_step"] == 8
    states = checkpoint["optimizer_states"][0]["state"]
    assert len(states) == len(checkpoint["state_dict"])  # AdamW moments for the prefix tensors only
    assert checkpoint["lr_schedulers"] and checkpoint["loops"]


def test_exported_prefix_is_just_the_materialized_keys_and_values(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, FAST)
    tensors = load_file(trained_run / "prefix" / "prefix.safetensors")
    config = cfg.model.backbone.random_config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = cfg.prefix.length * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected
    size = (trained_run / "prefix" / "prefix.safetensors").stat().st_size
    assert expected < size < expected + 1024  # plus a small header


def test_run_writes_generations_and_scores(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    assert metrics.keys() == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert 0.0 <= metrics["BLEU"] <= 100.0
    lines = (trained_run / "test_generations.jsonl").read_text().splitlines()
    assert len(lines) == 4  # debug=fast tests on 4 meaning representations
    assert {"source", "references", "generation"} <= json.loads(lines[0]).keys()
    assert (trained_run / "csv" / "metrics.csv").read_text().count("train/loss") == 1


def test_resuming_continues_the_same_run(trained_run: Path, tmp_path: Path) -> None:
    """Resuming the 8-step run from its step-4 checkpoint ends with the uninterrupted run's very prefix."""
    (halfway,) = (trained_run / "checkpoints").glob("step4.ckpt")
    at_step_4 = torch.load(halfway, weights_only=True)
    at_step_8 = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert at_step_4["global_step"] == 4
    assert all(not torch.equal(at_step_4["state_dict"][k], v) for k, v in at_step_8["state_dict"].items())
    log = run_cli(tmp_path, *FULL_SCORING, f"ckpt_path={halfway}")
    assert "Restored all states" in log.stderr + log.stdout
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = load_file(tmp_path / "prefix" / "prefix.safetensors")
    straight = load_file(trained_run / "prefix" / "prefix.safetensors")
    for group in straight:
        torch.testing.assert_close(resumed[group], straight[group], atol=1e-6, rtol=0)


def test_a_run_started_from_another_runs_checkpoint_keeps_its_own_validations(
    trained_run: Path, tmp_path: Path
) -> None:
    """Steps 5-6 from the other run's step-4 checkpoint, no validation of its own: the export is this run's last
    step, not the other run's best checkpoint, and the record names no best validation."""
    log = run_cli(
        tmp_path, *FAST, "export=best", "trainer.max_steps=6", f"ckpt_path={trained_run}/checkpoints/step4.ckpt"
    )
    assert "no validation checkpoint by val/bleu was kept: exporting the last step's" in log.stderr + log.stdout
    record = json.loads((tmp_path / "result.json").read_text())
    assert (record["train_steps"], record["export"], record["exported_step"]) == (6, "last", 6)
    assert (record["best_val"], record["best_val_step"], record["best_checkpoint"]) == (None, None, None)
    assert record["train_tokens"] > json.loads((trained_run / "result.json").read_text())["train_tokens"] / 2


def test_evaluating_the_export_reproduces_the_runs_test_score(trained_run: Path, tmp_path: Path) -> None:
    run_cli(tmp_path, *FULL_SCORING, f"prefix_path={trained_run / 'prefix'}", entry=("-m", "prefix_lightning.evaluate"))
    evaluated = json.loads((tmp_path / "test_metrics.json").read_text())
    assert evaluated == json.loads((trained_run / "test_metrics.json").read_text())
    assert (tmp_path / "test_generations.txt").read_text() == (trained_run / "test_generations.txt").read_text()


def test_evaluate_of_a_run_optimizing_the_validation_loss(trained_run: Path, tmp_path: Path) -> None:
    """The test scores outputs and logs no loss: evaluate still ends well (it failed on the missing test/loss)."""
    evaluate = ("-m", "prefix_lightning.evaluate")
    run_cli(
        tmp_path, f"export_path={trained_run}", "optimized_metric=val/loss", "data.metric_suite=bleu", entry=evaluate
    )
    assert json.loads((tmp_path / "test_metrics.json").read_text()).keys() == {"BLEU"}
