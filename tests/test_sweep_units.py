"""Sweep pieces without training: records, aggregation of made-up records, skip/resume decisions, the sweep and
launcher configs, and when W&B goes online."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prefix_lightning.sweeps.aggregate import aggregate, main
from prefix_lightning.sweeps.table import format_stat, sort_key
from prefix_lightning.training import dashboards
from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.optimized import settle_optimized_metric
from prefix_lightning.training.record import FIELDS, RECORD_FILE, read_record, write_record
from prefix_lightning.training.resume import (
    STARTED_CONFIG,
    check_earlier_attempt,
    finished_record,
    resume_checkpoint,
    run_config,
    run_overrides,
)
from tests.helpers.config import CONF, compose_train
from tests.helpers.sweeps import make_record, write_sweep

# Prefix length x data size, two training subsets and two seeds each: 4 repeats per setting.
GRID = [
    make_record(
        {"prefix.length": length, "data.train_size": size, "data.subset_seed": subset, "seed": seed, "model": "tiny"},
        bleu=length * 10 + size + subset + seed / 10,
        seed=seed,
    )
    for length in (1, 5, 10)
    for size in (50, 200)
    for subset in (1, 2)
    for seed in (1, 2)
]


def test_record_is_complete_only_with_every_field(tmp_path: Path) -> None:
    record = make_record({"prefix.length": 5}, bleu=3.0)
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    with pytest.raises(ValueError, match="lacks"):
        write_record(tmp_path, {"run": "x"})
    (tmp_path / RECORD_FILE).write_text(json.dumps({key: record[key] for key in FIELDS[:-1]}))
    assert read_record(tmp_path) is None
    (tmp_path / RECORD_FILE).write_text('{"run": ')  # cut short
    assert read_record(tmp_path) is None


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("test", None, "`test` is not an object"), ("overrides", [], "`overrides` is not an object")]
    + [("test", {"test/bleu": "31.2"}, "`test/bleu` is not a number"), ("best_val", "high", "`best_val` is not a")],
)
def test_a_malformed_record_is_named_and_listed_unfinished_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: object, problem: str
) -> None:
    """A hand-edited record with a field of the wrong type: aggregation stopped at it with "'NoneType' object is not
    a mapping", naming neither the file nor the field."""
    records = [make_record({"prefix.length": length}, bleu=float(length)) for length in (1, 2, 3)]
    records[2][field] = value
    write_sweep(tmp_path, records)
    out = aggregate(tmp_path)
    assert out is not None and "| 3 |" not in (out / "results.md").read_text()
    assert f"{records[2]['run']}/{RECORD_FILE}: {problem}" in caplog.text
    assert f"<code>{records[2]['run']}</code>" in (out / "report.html").read_text()  # listed as unfinished


def test_an_older_runs_record_without_its_export_counts_as_finished(tmp_path: Path) -> None:
    """Records written before export/exported_step existed stay finished runs: a sweep does not train them again."""
    older = {key: value for key, value in make_record({}, bleu=1.0).items() if key not in ("export", "exported_step")}
    (tmp_path / RECORD_FILE).write_text(json.dumps(older))
    assert finished_record(tmp_path) == older


def test_a_swept_text_holding_a_bar_keeps_its_markdown_cell(tmp_path: Path) -> None:
    write_sweep(tmp_path, [make_record({"prefix.init_text": text}, bleu=1.0) for text in ("a | b", "c")])
    table = (aggregate(tmp_path) / "results.md").read_text().splitlines()
    assert table[2].startswith("| a \\| b | 1 |")
    assert table[2].count(" | ") == table[3].count(" | ") == table[0].count(" | ")  # as many cells as the header
    assert table[1] == "|" + "---|" * (table[0].count(" | ") + 1)  # and the line under the header


def test_a_swept_text_is_shown_as_text_in_the_report(tmp_path: Path) -> None:
    write_sweep(tmp_path, [make_record({"prefix.init_text": text}, bleu=1.0) for text in ("<b>fish & chips</b>", "c")])
    html = (aggregate(tmp_path) / "report.html").read_text()
    assert "<td>&lt;b&gt;fish &amp; chips&lt;/b&gt;</td>" in html and "<b>" not in html


def test_table_averages_over_seeds_and_subsets(tmp_path: Path) -> None:
    write_sweep(tmp_path, GRID)
    out = aggregate(tmp_path)
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6  # 3 lengths x 2 sizes
    assert list(rows[0])[:3] == ["data.train_size", "prefix.length", "runs"]  # seeds are averaged, not columns
    for row in rows:
        length, size = int(row["prefix.length"]), int(row["data.train_size"])
        bleus = [
            r["test"]["test/bleu"]
            for r in GRID
            if (r["overrides"]["prefix.length"], r["overrides"]["data.train_size"]) == (length, size)
        ]
        assert row["runs"] == "4"
        assert float(row["test/bleu_mean"]) == pytest.approx(statistics.fmean(bleus))
        assert float(row["test/bleu_std"]) == pytest.approx(statistics.stdev(bleus))
        assert float(row["val/bleu_best_mean"]) == pytest.approx(statistics.fmean(bleus) + 1.0)
    assert [(row["data.train_size"], row["prefix.length"]) for row in rows][:3] == [
        ("50", "1"),
        ("50", "5"),
        ("50", "10"),
    ]
    markdown = (out / "results.md").read_text()
    assert "| 50 | 10 | 4 |" in markdown and " ± " in markdown
    assert "Shared by all runs: `model=tiny`" in markdown
    assert {path.name for path in out.glob("*.png")} == {
        "test_bleu_vs_prefix_length.png",
        "test_bleu_vs_training_examples.png",
    }


@pytest.mark.parametrize(
    ("mean", "std", "text"),
    [
        (52.164, 10.0712, "52.16 ± 10.07"),
        (2781.4, 681.82, "2,781 ± 682"),  # the std to the mean's decimals
        (6208640.0, 0.0, "6,208,640 ± 0"),
        (0.4, 1234.5, "0.4000 ± 1,234.5000"),
        (1.2367, 0.0123, "1.237 ± 0.012"),  # four significant digits: a loss's small differences show
        (0.44231, 0.00512, "0.4423 ± 0.0051"),
        (-0.0012, 0.0, "-0.0012 ± 0.0000"),  # at most 4 decimals
        (0.0, 0.5, "0.00 ± 0.50"),
        (1.5, None, "1.500"),  # a single run: no spread to show
    ],
)
def test_mean_and_std_are_written_to_the_means_decimals(mean: float, std: float | None, text: str) -> None:
    assert format_stat(mean, std) == text


def test_a_metric_column_takes_the_decimals_of_its_largest_mean(tmp_path: Path) -> None:
    write_sweep(
        tmp_path, [make_record({"prefix.length": 1}, bleu=5.123), make_record({"prefix.length": 10}, bleu=150.0)]
    )
    table = (aggregate(tmp_path) / "results.md").read_text()
    assert "| 1 | 1 | 6.12 | 5.12 |" in table and "| 10 | 1 | 151.00 | 150.00 |" in table


def test_swept_values_sort_missing_then_numbers_then_text_and_flags() -> None:
    """A flag (true) is no number in a table's order, though Python's bool is an int."""
    assert sorted([True, 2, "a", None, 1.5], key=sort_key) == [None, 1.5, 2, "a", True]


def test_report_is_one_self_contained_page(tmp_path: Path) -> None:
    write_sweep(tmp_path, GRID)
    (tmp_path / "prefix.length=40" / ".hydra").mkdir(parents=True)  # a job that has not finished
    out = aggregate(tmp_path, metric="val/bleu_best")
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 2
    assert "<img" in html and "http" not in html  # nothing fetched from elsewhere
    assert "<td>10</td>" in html and "Unfinished runs (1)" in html and "prefix.length=40" in html
    assert {path.name for path in out.glob("*.png")} == {
        "val_bleu_best_vs_prefix_length.png",
        "val_bleu_best_vs_training_examples.png",
    }


def test_one_line_per_method_when_several(tmp_path: Path) -> None:
    records = [
        make_record({"method": method, "data.train_size": size}, bleu=size / 10 + offset)
        for method, offset in (("prefix", 0), ("finetune", 5))
        for size in (50, 100, 200)
    ]
    write_sweep(tmp_path, records)
    out = aggregate(tmp_path)
    assert [path.name for path in out.glob("*.png")] == ["test_bleu_vs_training_examples.png"]  # length not swept
    with open(out / "results.csv") as file:
        settings = [(row["data.train_size"], row["method"]) for row in csv.DictReader(file)]
    assert settings == [(size, method) for size in ("50", "100", "200") for method in ("finetune", "prefix")]


def test_aggregate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sweep(tmp_path, GRID[:4])
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("| ") and f"report: {tmp_path / 'summary' / 'report.html'}" in printed
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "missing")])
    assert stopped.value.code == 2 and f"{tmp_path / 'missing'} is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:  # a folder without finished runs: nothing to aggregate
        main([str(tmp_path / "empty")])
    assert stopped.value.code == 1 and not (tmp_path / "empty" / "summary").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--metric", "test/bogus"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.startswith("error: metric 'test/bogus' is not in the records of")


def test_a_folder_above_several_sweeps_is_refused_not_merged(tmp_path: Path) -> None:
    for sweep in ("lengths", "sizes"):
        write_sweep(tmp_path / sweep, GRID[:4])
        (tmp_path / sweep / "multirun.yaml").write_text("{}")
    with pytest.raises(ValueError, match=r"holds 2 sweeps \(lengths, sizes\): aggregate each of them"):
        aggregate(tmp_path)
    assert aggregate(tmp_path / "lengths") == tmp_path / "lengths" / "summary"


def test_a_single_runs_folder_is_refused_not_summarized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sweep(tmp_path, GRID[:2])
    run = tmp_path / GRID[0]["run"]
    with pytest.raises(SystemExit) as stopped:
        main([str(run)])
    assert stopped.value.code == 1 and not (run / "summary").exists()
    assert f"{run} is a single run's folder (it holds {RECORD_FILE}), not a sweep's" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"unfinished is a single run's folder \(it holds \.hydra\)"):
        aggregate(unfinished)  # not 'no finished runs below' it
    (tmp_path / "multirun.yaml").write_text("{}")
    write_record(tmp_path, GRID[2])  # a multirun of one job without overrides: the job's folder is the sweep's
    assert aggregate(tmp_path) == tmp_path / "summary"


def test_finished_runs_are_skipped_and_unfinished_ones_resume(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["model=tiny_llama"])
    assert finished_record(tmp_path) is None and resume_checkpoint(cfg) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, last)
    assert resume_checkpoint(cfg) == str(last)
    elsewhere = tmp_path / "elsewhere.ckpt"
    torch.save({"state_dict": {}, "global_step": 5}, elsewhere)
    assert resume_checkpoint(compose_train(tmp_path, [f"ckpt_path={elsewhere}"])) == str(elsewhere)
    last.write_bytes(b"")  # a killed copy
    with pytest.raises(ValueError, match=f"checkpoint {last} cannot be used: it is truncated"):
        resume_checkpoint(cfg)
    write_record(tmp_path, make_record({}, bleu=1.0))
    assert finished_record(tmp_path)["last_val"] == 1.5


def test_a_folder_as_ckpt_path_is_refused_unless_deepspeed_reads_it(tmp_path: Path) -> None:
    """A run folder or its checkpoints/ given as ckpt_path stopped in torch's words once the model had loaded."""
    with pytest.raises(ConfigError, match=f"ckpt_path={tmp_path} is a folder, not a checkpoint file: give one of"):
        resume_checkpoint(compose_train(tmp_path, [f"ckpt_path={tmp_path}"]))
    deepspeed = compose_train(tmp_path, ["trainer=deepspeed_zero2", f"ckpt_path={tmp_path}"])
    assert resume_checkpoint(deepspeed) == str(tmp_path)  # DeepSpeed's checkpoints are folders


def test_an_unfinished_run_resumes_from_the_newest_checkpoint_in_its_folder(tmp_path: Path) -> None:
    """A SLURM requeue's hpc_ckpt_<n>.ckpt is newer than last.ckpt when the job was preempted after its last save."""
    cfg = compose_train(tmp_path, ["model=tiny_llama"])
    last, requeued = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.parent.mkdir()
    for age, path in ((100, last), (0, requeued)):
        torch.save({"state_dict": {}, "global_step": 3}, path)
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    assert resume_checkpoint(cfg) == str(requeued)
    os.utime(last)  # saved again since
    assert resume_checkpoint(cfg) == str(last)


def test_a_folder_run_again_is_checked_against_the_config_its_run_started_with(tmp_path: Path) -> None:
    """A sweep's job folder (or a fixed hydra.run.dir) run again skips or resumes what is there: settings that the
    folder's name leaves out (callbacks, trainer, ...) and that change what the run computes are refused."""
    started = tmp_path / STARTED_CONFIG

    def attempt(*overrides: str) -> None:
        check_earlier_attempt(compose_train(tmp_path, ["model=tiny_llama", *overrides]))

    attempt("prefix.length=5")  # the run starts from nothing: its config is kept
    assert OmegaConf.load(started).prefix.length == 5
    attempt("prefix.length=3")  # nothing computed yet (no record, no checkpoint): it starts anew
    assert OmegaConf.load(started).prefix.length == 3
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, last)
    attempt("prefix.length=3", "logger=tensorboard", "paths.data_dir=/elsewhere", "data.num_workers=1")
    attempt("prefix.length=3", "trainer.max_steps=7", f"ckpt_path={last}")  # starts from a checkpoint chosen
    with pytest.raises(ConfigError) as refused:
        attempt("prefix.length=3", "callbacks.early_stopping.patience=2", "trainer.max_steps=7")
    assert str(refused.value) == (
        f"{tmp_path} holds an earlier attempt of this run (its result.json or checkpoint), whose settings "
        f"(.hydra/started_config.yaml) differ from these and change what it computes: "
        "callbacks.early_stopping.patience: None -> 2; trainer.max_steps: 150 -> 7. Run again without them, "
        "delete the folder to start it anew, or give the run (the sweep) another folder: hydra.run.dir=... "
        "(hydra.sweep.dir=...) (the run's own: callbacks.early_stopping.patience=null trainer.max_steps=150)"
    )
    last.unlink()
    write_record(tmp_path, make_record({}, bleu=1.0))  # finished: to be skipped, and checked the same way
    with pytest.raises(ConfigError, match="trainer.max_steps: 150 -> 7"):
        attempt("prefix.length=3", "trainer.max_steps=7")
    assert OmegaConf.load(started).prefix.length == 3 and OmegaConf.load(started).trainer.max_steps == 150


def test_a_refused_attempt_leaves_the_runs_own_config_and_overrides_to_its_readers(tmp_path: Path) -> None:
    """Hydra writes .hydra/ before the attempt is checked: a refused re-run rewrote what export, evaluate and
    generate read (export then refused the run's own checkpoint)."""
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- prefix.hidden_dim=512\n")
    check_earlier_attempt(compose_train(tmp_path, ["model=tiny_llama", "prefix.hidden_dim=512"]))  # the first
    write_record(tmp_path, make_record({}, bleu=1.0))
    (hydra / "config.yaml").write_text("prefix:\n  hidden_dim: 256\n")  # what the refused re-run leaves
    (hydra / "overrides.yaml").write_text("- prefix.hidden_dim=256\n")
    with pytest.raises(ConfigError, match="prefix.hidden_dim: 512 -> 256"):
        check_earlier_attempt(compose_train(tmp_path, ["model=tiny_llama", "prefix.hidden_dim=256"]))
    assert run_config(tmp_path).prefix.hidden_dim == 512
    assert run_overrides(tmp_path) == ["prefix.hidden_dim=512"]


SWEEPS = sorted(path.stem for path in (CONF / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_configs_name_their_folder_and_sweep_existing_keys(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == f"multirun/{name}"
    params = cfg.hydra.sweeper.params
    assert params
    for key in params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", f"{name} sweeps {key}, which no config has"
    if name == "optuna":
        assert cfg.hydra.sweeper.direction == "maximize"
        assert set(params) == {"method.lr", "prefix.length", "prefix.hidden_dim"}
        assert instantiate(cfg.hydra.sweeper).__class__.__name__ == "OptunaSweeper"


@pytest.mark.parametrize(
    ("metric", "direction", "refused"),
    [("val/loss", "maximize", True), ("val/loss", "minimize", False), ("null", "maximize", False)],
)
def test_an_optuna_search_in_the_wrong_direction_is_refused(metric: str, direction: str, refused: bool) -> None:
    """Maximizing val/loss would pick the worst trial as the best."""
    overrides = ["+sweep=optuna", f"optimized_metric={metric}", f"hydra.sweeper.direction={direction}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with (
            pytest.raises(ConfigError, match="val/loss is best at its minimum: give hydra.sweeper.direction=minimize")
            if refused
            else contextlib.nullcontext()
        ):
            settle_optimized_metric(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_plain_multirun_folder_is_named_after_the_task() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["prefix.length=3"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == "multirun/train"
    assert "${now:" not in OmegaConf.to_yaml(cfg.hydra.sweep)


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")],
)
def test_launcher_configs_instantiate(launcher: str, target: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    built = instantiate(cfg.hydra.launcher)
    assert type(built).__name__ == target
    # Our file's settings reach the launcher (submitit_local is the plugin's own config; the folder is interpolated).
    ours = CONF / "hydra" / "launcher" / f"{launcher}.yaml"
    written = OmegaConf.to_container(OmegaConf.load(ours)) if ours.is_file() else {}
    settings = {key: value for key, value in written.items() if key not in ("defaults", "submitit_folder")}
    received = built.joblib if launcher == "parallel" else built.params
    assert {key: received[key] for key in settings} == settings


def test_wandb_goes_online_only_with_an_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert dashboards.wandb_logger(save_dir=str(tmp_path))._offline
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert not dashboards.wandb_logger(save_dir=str(tmp_path))._offline
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert dashboards.wandb_api_key_configured()
    assert not dashboards.wandb_logger(save_dir=str(tmp_path), offline=False)._offline
    assert dashboards.wandb_logger(save_dir=str(tmp_path), offline=True)._offline
