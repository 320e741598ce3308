"""The validation metric per dataset, the best validation checkpoint, early stopping and export=best."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from prefix_lightning.evaluation import main_validation_metric, validation_metrics
from prefix_lightning.prefix import PrefixModel
from prefix_lightning.training.build import build_model, load_configured_backbone
from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.early_stopping import early_stopping
from prefix_lightning.training.method_export import MethodExport, kept_best_checkpoint
from prefix_lightning.training.module import MethodModule
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.result_record import ResultRecord
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_train
from tests.helpers.tiny import tiny_lm


def test_validation_scores_bleu_for_table_to_text_and_rouge_for_xsum() -> None:
    assert validation_metrics("e2e") == {"val/loss": "min", "val/bleu": "max"}
    rouge = {"val/rouge1": "max", "val/rouge2": "max", "val/rougel": "max"}
    assert validation_metrics("xsum") == {"val/loss": "min", **rouge}
    assert [main_validation_metric(suite) for suite in ("e2e", "webnlg", "dart", "bleu", "xsum")] == [
        *["val/bleu"] * 4,
        "val/rougel",
    ]


@pytest.mark.parametrize(
    ("overrides", "metric", "mode"),
    [
        ([], "val/bleu", "max"),
        (["data=xsum_sample"], "val/rougel", "max"),
        (["experiment=paper_xsum"], "val/rougel", "max"),
        (["data=xsum_sample", "optimized_metric=val/rouge2"], "val/rouge2", "max"),
        (["optimized_metric=val/loss"], "val/loss", "min"),
    ],
)
def test_the_optimized_metric_defaults_to_the_datasets_own(
    overrides: list[str], metric: str, mode: str, tmp_path: Path
) -> None:
    cfg = compose_train(tmp_path, overrides)
    settle_optimized_metric(cfg)
    assert (cfg.optimized_metric, cfg.optimized_mode) == (metric, mode)
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (metric, mode)
    assert (cfg.callbacks.early_stopping.monitor, cfg.callbacks.result_record.mode) == (metric, mode)


@pytest.mark.parametrize(("metric", "mode", "best"), [("val/loss", "max", "min"), ("val/bleu", "min", "max")])
def test_a_mode_against_the_metrics_direction_is_refused(metric: str, mode: str, best: str, tmp_path: Path) -> None:
    """It kept the worst checkpoint, without a word; a mode that is not max or min is refused the same way."""
    for given in (mode, "maxx"):
        cfg = compose_train(tmp_path, [f"optimized_metric={metric}", f"optimized_mode={given}"])
        with pytest.raises(ConfigError, match=f"optimized_mode='{given}' is not valid: {metric} is best at its {best}"):
            settle_optimized_metric(cfg)


def test_a_metric_validation_does_not_log_is_refused_with_the_ones_it_does(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["optimized_metric=val/rougel"])
    with pytest.raises(ConfigError, match=r"optimized_metric='val/rougel' is not valid: .* logs val/loss, val/bleu"):
        settle_optimized_metric(cfg)


def test_early_stopping_counts_validations_without_an_improvement_of_min_delta_in_the_metrics_direction() -> None:
    callback = early_stopping("val/loss", "min", patience=2, min_delta=0.5)
    assert callback is not None and callback.monitor == "val/loss"
    stops = [callback._evaluate_stopping_criteria(torch.tensor(loss))[0] for loss in (3.0, 2.0, 1.7, 1.6)]
    assert stops == [False, False, False, True]  # 1.7 and 1.6 improve on 2.0 by less than 0.5


def test_the_record_keeps_the_first_best_validation_in_the_metrics_direction(tmp_path: Path) -> None:
    """Ties keep the earlier step, as the best checkpoint does (Lightning replaces it only on a strict improvement);
    the sanity check's validation is no validation of the run."""
    record = ResultRecord(str(tmp_path), monitor="val/loss", mode="min")
    for step, loss, sanity in ((0, 0.1, True), (2, 2.0, False), (4, 1.0, False), (6, 1.0, False), (8, 1.5, False)):
        trainer = SimpleNamespace(sanity_checking=sanity, global_step=step, callback_metrics={"val/loss": loss})
        record.on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert (record.progress["best_val"], record.progress["best_val_step"], record.progress["last_val"]) == (1.0, 4, 1.5)


def test_the_best_checkpoint_is_the_runs_own_not_one_restored_from_another_runs_checkpoint(tmp_path: Path) -> None:
    """Lightning restores the best path of a checkpoint a run started from (``ckpt_path=`` of another run)."""
    callback = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", monitor="val/bleu", mode="max")
    trainer = SimpleNamespace(checkpoint_callbacks=[callback])
    callback.best_model_path = str(tmp_path / "other" / "checkpoints" / "step4.ckpt")
    assert kept_best_checkpoint(trainer) is None  # type: ignore[arg-type]
    callback.best_model_path = str(tmp_path / "run" / "checkpoints" / "step2.ckpt")
    assert kept_best_checkpoint(trainer) == callback.best_model_path  # type: ignore[arg-type]


def test_an_export_of_the_last_weights_states_the_last_validations_score_not_the_best_ones(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/bleu", mode="max")
    callback.best_model_score = torch.tensor(5.0)  # an earlier validation's
    trainer = SimpleNamespace(
        global_step=6,
        checkpoint_callbacks=[callback],
        callback_metrics={"val/bleu": torch.tensor(2.0)},
        strategy=SingleDeviceStrategy(torch.device("cpu")),
        is_global_zero=True,
    )
    module = MethodModule(PrefixModel(tiny_lm("gpt2"), length=2), tokenizer=None, output_dir=str(tmp_path))
    export = MethodExport(str(tmp_path / "prefix"), weights="last")
    export.on_train_end(trainer, module)  # type: ignore[arg-type]
    assert export.state_dict() == {"source": "last", "step": 6, "validation": {"val/bleu": 2.0}}


def test_the_record_keeps_its_validations_on_a_resume_and_drops_another_runs(tmp_path: Path) -> None:
    written = ResultRecord(str(tmp_path / "run"), monitor="val/bleu")
    written.progress.update(best_val=3.0, best_val_step=4, last_val=2.0, train_tokens=10)
    for folder, validations in (("run", (3.0, 4, 2.0)), ("other", (None, None, None))):
        record = ResultRecord(str(tmp_path / folder), monitor="val/bleu")
        record.load_state_dict(written.state_dict())
        assert tuple(record.progress[name] for name in ("best_val", "best_val_step", "last_val")) == validations
        assert record.progress["train_tokens"] == 10  # the steps trained count either way


def _prefix_of_checkpoint(cfg, checkpoint: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The prefix a run's checkpoint holds, on the run's own model."""
    model, _ = build_model(cfg)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()}, strict=False)
    return model.prefix_key_values()


@pytest.mark.integration
def test_early_stopping_stops_a_stalled_run_and_the_export_is_the_best_checkpoint(tmp_path: Path) -> None:
    """A tiny random model's validation BLEU stays 0: the first validation is the best, and patience 2 stops the
    run two validations later instead of at step 40."""
    overrides = [
        "model=tiny_llama",
        "debug=fast",
        "trainer.max_steps=40",
        "trainer.val_check_interval=2",
        "callbacks.early_stopping.patience=2",
    ]
    run_cli(tmp_path, *overrides)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["train_steps"] == 6  # validations at 2 (best), 4 and 6 (no improvement): stopped
    assert (record["optimized_metric"], record["best_val_step"]) == ("val/bleu", 2)
    assert (record["export"], record["exported_step"]) == ("best", 2)
    assert record["best_checkpoint"] == "checkpoints/step2.ckpt"

    cfg = compose_train(tmp_path, overrides)
    best = _prefix_of_checkpoint(cfg, tmp_path / "checkpoints" / "step2.ckpt")
    last = _prefix_of_checkpoint(cfg, tmp_path / "checkpoints" / "last.ckpt")
    lm, _ = load_configured_backbone(cfg)
    exported = PrefixModel.from_prefix(lm, tmp_path / "prefix").prefix_key_values()
    for name, (keys, values) in exported.items():
        torch.testing.assert_close(keys, best[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(values, best[name][1], atol=1e-6, rtol=0)
        assert not torch.allclose(keys, last[name][0])  # the steps after the best one did change the prefix


@pytest.mark.integration
def test_xsum_validation_logs_rouge_and_picks_the_best_checkpoint_by_rouge_l(tmp_path: Path) -> None:
    xsum = ["data=xsum_sample", "generation=summarization", "data.metric_suite=xsum"]
    run_cli(tmp_path, "model=tiny_bart", "debug=fast", *xsum)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["optimized_metric"] == "val/rougel" and record["best_val"] is not None
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/rouge1", "val/rouge2", "val/rougel", "test/rougel"} <= set(header) and "val/bleu" not in header
