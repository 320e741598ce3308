"""Real multiruns from the command line on a tiny model: job folders and records, the aggregated table, plots and
report, the dashboards (W&B offline, TensorBoard), a sweep killed and re-run, and submitit's local executor."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prefix_lightning.training.record import RECORD_FILE, read_record
from tests.helpers.cli import FAST, run_cli, run_failing, run_python
from tests.helpers.config import REPO
from tests.helpers.faults import fault

pytestmark = pytest.mark.integration

TINY = ["model=tiny_llama", "debug=fast"]
GRID = [*TINY, "trainer.max_steps=2", "prefix.length=1,2", "data.train_size=8,16", "logger=[tensorboard,wandb]"]
GRID_JOBS = {
    (length, size): f"data.train_size={size},debug=fast,model=tiny_llama,prefix.length={length},trainer.max_steps=2"
    for length in (1, 2)
    for size in (8, 16)
}


@pytest.fixture(scope="module")
def env(data_dir: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The data, W&B offline and kept inside the test's folders."""
    wandb_home = tmp_path_factory.mktemp("wandb_home")
    return {
        **os.environ,
        "PREFIX_LIGHTNING_DATA": str(data_dir),
        "PREFIX_LIGHTNING_TOKENIZER": str(tokenizer_dir),
        "WANDB_MODE": "offline",
        **{f"WANDB_{name}_DIR": str(wandb_home / name.lower()) for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT")},
    }


def sweep_arguments(sweep_dir: Path, overrides: list[str]) -> list[str]:
    return ["run.py", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_sweep(sweep_dir: Path, overrides: list[str], env: dict[str, str]) -> str:
    """`python run.py -m ...` as a user types it; returns its log."""
    result = run_python(*sweep_arguments(sweep_dir, overrides), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    sweep_dir = tmp_path_factory.mktemp("grid") / "length_size"
    run_sweep(sweep_dir, GRID, env)
    return sweep_dir


def records(sweep_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    return {key: read_record(sweep_dir / name) for key, name in GRID_JOBS.items()}


def test_jobs_are_named_by_their_swept_values_and_write_complete_records(grid: Path) -> None:
    assert {path.name for path in grid.iterdir() if path.is_dir()} == {*GRID_JOBS.values(), "summary"}
    for (length, size), record in records(grid).items():
        assert record is not None, f"no complete record for {(length, size)}"
        assert record["overrides"] == {
            "model": "tiny_llama",
            "debug": "fast",
            "trainer.max_steps": 2,
            "prefix.length": length,
            "data.train_size": size,
            "logger": ["tensorboard", "wandb"],
        }
        assert (record["prefix_length"], record["train_size"], record["seed"], record["subset_seed"]) == (
            length,
            size,
            1,
            0,
        )
        assert record["train_steps"] == 2 and record["train_tokens"] > 0 and record["tokens_per_s"] > 0
        assert record["optimized_metric"] == "val/bleu" and record["best_val"] is not None
        assert set(record["test"]) == {"test/bleu"}
        assert record["wall_time_s"] > 0 and record["trainable_params"] > 0
        run_dir = grid / GRID_JOBS[(length, size)]
        assert (run_dir / record["checkpoint"]).is_file() and (
            run_dir / record["prefix"] / "prefix.safetensors"
        ).is_file()
    params = {length: records(grid)[(length, 8)]["trainable_params"] for length in (1, 2)}
    assert params[1] < params[2]  # a longer prefix has more parameters


def test_aggregated_table_holds_the_records_values(grid: Path) -> None:
    with open(grid / "summary" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    by_setting = records(grid)
    assert [(int(row["prefix.length"]), int(row["data.train_size"])) for row in rows] == sorted(
        by_setting, key=lambda key: (key[1], key[0])
    )
    for row in rows:
        record = by_setting[(int(row["prefix.length"]), int(row["data.train_size"]))]
        assert row["runs"] == "1"
        assert float(row["test/bleu_mean"]) == record["test"]["test/bleu"]
        assert float(row["val/bleu_best_mean"]) == record["best_val"]
        assert float(row["trainable_params_mean"]) == record["trainable_params"]
        assert float(row["tokens_per_s_mean"]) == record["tokens_per_s"]
        assert row["test/bleu_std"] == ""  # one seed: no spread
    markdown = (grid / "summary" / "results.md").read_text()
    assert markdown.startswith("| data.train_size | prefix.length | runs | val/bleu_best | test/bleu |")
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 5


def test_plots_and_report(grid: Path) -> None:
    plots = sorted((grid / "summary").glob("*.png"))
    assert [path.name for path in plots] == ["test_bleu_vs_prefix_length.png", "test_bleu_vs_training_examples.png"]
    for path in plots:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    html = (grid / "summary" / "report.html").read_text()
    assert "<h1>length_size</h1>" in html and "4 finished runs in 4 settings" in html
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html


def read_wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file: a LevelDB-style log of 32 KiB blocks of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    position, pending, records = header, b"", []  # the file starts with a 7-byte W&B header
    while position + header <= len(data):
        left = block - position % block
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if left < header or (kind == 0 and length == 0):  # block trailer or padding
            position += left
            continue
        pending += data[position + header : position + header + length]
        position += header + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_each_job_is_its_own_wandb_run_with_metrics_and_samples(grid: Path) -> None:
    for name in GRID_JOBS.values():
        (run_file,) = (grid / name / "wandb").glob("offline-run-*/run-*.wandb")
        wandb_records = read_wandb_records(run_file)
        (run,) = [record.run for record in wandb_records if record.HasField("run")]
        assert (run.display_name, run.run_group) == (name, "length_size")
        config_keys = {
            item.key for record in wandb_records if record.HasField("config") for item in record.config.update
        }
        assert {"model", "prefix", "optim", "trainer"} <= config_keys  # the composed config
        (generation,) = [
            json.loads(item.value_json)
            for record in wandb_records
            if record.HasField("config")
            for item in record.config.update
            if item.key == "generation"
        ]
        assert "ban_newline" in generation and "bad_words_ids" not in generation  # as configured, not as decoded
        logged = {
            item.key or "/".join(item.nested_key): item.value_json
            for record in wandb_records
            if record.HasField("history")
            for item in record.history.item
        }
        assert {"train/loss", "val/loss", "val/bleu", "test/bleu"} <= logged.keys()
        assert logged["val/samples/_type"] == '"table-file"' and logged["val/samples/nrows"] == "4"
        summary = {
            item.key: item.value_json
            for record in wandb_records
            if record.HasField("summary")
            for item in record.summary.update
        }
        assert float(summary["result/test/bleu"]) == read_record(grid / name)["test"]["test/bleu"]


def test_tensorboard_has_metrics_samples_and_hparams(grid: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = grid / GRID_JOBS[(2, 16)]
    scalars, texts, plugins = set(), set(), set()
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        texts |= set(accumulator.Tags()["tensors"])
        with contextlib.suppress(KeyError):  # only the file written after testing has them
            plugins |= set(accumulator.PluginTagToContent("hparams"))
    assert {"train/loss", "val/loss", "val/bleu", "test/bleu", "result/test/bleu"} <= scalars
    assert {"val/samples/text_summary", "test/samples/text_summary"} <= texts
    assert "_hparams_/experiment" in plugins
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    steps = {tag: [event.step for event in accumulator.Tensors(tag)] for tag in ("val/samples/text_summary",)}
    steps["val/bleu"] = [event.step for event in accumulator.Scalars("val/bleu")]
    assert steps["val/samples/text_summary"] == steps["val/bleu"] == [1]  # the validation after step 2
    assert (run_dir / "csv" / "metrics.csv").is_file()  # CSV is kept next to the dashboards


def test_a_killed_run_resumed_continues_its_dashboards(tmp_path: Path, env: dict[str, str]) -> None:
    """Killed (SIGKILL) after step 6, resumed from its step-4 checkpoint: one W&B run in two attempts, and
    TensorBoard without the steps the killed attempt logged after its checkpoint (as metrics.csv)."""
    run = [*FAST, "logger=[tensorboard,wandb]"]
    killed = run_failing(tmp_path, *run, *fault("SignalAt", step=6, name="SIGKILL"), env=env)
    assert killed.returncode == -signal.SIGKILL
    run_cli(tmp_path, *run, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", env=env)

    attempts = sorted((tmp_path / "wandb").glob("offline-run-*"))  # offline-run-<time>-<run id>
    assert len(attempts) == 2 and len({folder.name.rsplit("-", 1)[1] for folder in attempts}) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == list(range(8))
    assert [event.step for event in accumulator.Scalars("val/bleu")] == [3, 7]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the sweep ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def test_rerunning_a_killed_sweep_skips_finished_jobs_and_resumes_the_rest(tmp_path: Path, env: dict[str, str]) -> None:
    """Killed (SIGKILL) once the second job has checkpointed: re-running the same command leaves the first job's
    record untouched and continues the second from its checkpoint; re-running it with other settings is refused."""
    sweep_dir, overrides = tmp_path / "sweep", [*TINY, "prefix.length=1,2"]
    first, second = (sweep_dir / f"debug=fast,model=tiny_llama,prefix.length={length}" for length in (1, 2))
    process = subprocess.Popen(
        [sys.executable, *sweep_arguments(sweep_dir, overrides)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(second / "checkpoints" / "last.ckpt", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert read_record(first) is not None, "the first job had finished"
    assert not (second / RECORD_FILE).exists(), "the second job was killed before its end"
    before = (first / RECORD_FILE).stat().st_mtime_ns, (first / RECORD_FILE).read_bytes()

    log = run_sweep(sweep_dir, overrides, env)
    assert f"skipped: {first} already holds a complete {RECORD_FILE}" in log
    assert f"resuming from {second / 'checkpoints' / 'last.ckpt'}" in log
    assert "Restored all states" in log
    assert ((first / RECORD_FILE).stat().st_mtime_ns, (first / RECORD_FILE).read_bytes()) == before
    assert json.loads(before[1])["train_steps"] == 4
    resumed = read_record(second)
    assert resumed["train_steps"] == 4 and resumed["test"]
    assert "2 finished runs in 2 settings" in log

    # Run again with a change the job folders' names leave out (a sweep config's body), but that changes what the
    # jobs compute: refused, each job naming the change.
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  gradient_clip_val: 0.5\n")
    mine = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+sweep=mine"]
    changed = run_python(*sweep_arguments(sweep_dir, [*mine, *overrides]), env=env)
    assert changed.returncode == 1
    for job in (first, second):
        assert f"error: {job} holds an earlier attempt of this run" in changed.stderr
    assert "trainer.gradient_clip_val: 1.0 -> 0.5" in changed.stderr
    assert ((first / RECORD_FILE).stat().st_mtime_ns, (first / RECORD_FILE).read_bytes()) == before


def test_a_failing_job_is_named_at_the_end_and_the_jobs_after_it_still_run(tmp_path: Path, env: dict[str, str]) -> None:
    sweep_dir = tmp_path / "sweep"
    sizes = ("99999", "8")  # the first fails at its setup
    result = run_python(
        *sweep_arguments(sweep_dir, [*TINY, "trainer.max_steps=2", f"data.train_size={','.join(sizes)}"]), env=env
    )
    assert result.returncode == 1
    failed, finished = (
        sweep_dir / f"data.train_size={size},debug=fast,model=tiny_llama,trainer.max_steps=2" for size in sizes
    )
    assert read_record(finished) is not None
    assert f"error in the job {failed}: train_size=99999, but devset.csv has " in result.stderr
    assert f"python -m prefix_lightning.sweeps.aggregate {sweep_dir}" in result.stderr
    assert "Traceback" not in result.stderr
    report = (sweep_dir / "summary" / "report.html").read_text()  # written as the sweep's process exits
    assert "Unfinished runs (1)" in report and failed.name in report


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path: Path, env: dict[str, str]) -> None:
    sweep_dir = tmp_path / "sweep"
    log = run_sweep(sweep_dir, ["hydra/launcher=submitit_local", *TINY, "trainer.max_steps=2", "prefix.length=3"], env)
    assert "Submitit 'local' sweep output dir" in log
    record = read_record(sweep_dir / "debug=fast,model=tiny_llama,prefix.length=3,trainer.max_steps=2")
    assert record is not None and record["prefix_length"] == 3
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # the job ran in a submitit process
    assert (sweep_dir / "summary" / "report.html").is_file()  # aggregated by the launching process


@pytest.mark.integration
def test_lowdata_sweep_ends_with_its_paired_comparison(tmp_path: Path, env: dict[str, str]) -> None:
    """The shipped +sweep=smollm2_lowdata, narrowed to a tiny model: prefix and full on two subsets; the multirun's
    own aggregation writes the paired table. (The sweep's own test size and metrics come after debug=fast.)"""
    sweep_dir = tmp_path / "lowdata"
    small = ["data.train_size=16", "data.test_size=4", "data.metric_suite=bleu"]
    overrides = ["+sweep=smollm2_lowdata", *TINY, *small, "data.subset_seed=1,2"]
    log = run_sweep(sweep_dir, overrides, env)
    jobs = {path.parent.name for path in sweep_dir.glob(f"*/{RECORD_FILE}")}
    assert jobs == {
        f"data.metric_suite=bleu,data.subset_seed={subset},data.test_size=4,data.train_size=16,debug=fast,"
        f"method={method},model=tiny_llama,seed=1"
        for subset in (1, 2)
        for method in ("prefix", "full")
    }
    assert "paired comparison" in log
    with open(sweep_dir / "summary" / "paired.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["metric"], row["pairs"]) for row in rows] == [("test/bleu", "2")]
    assert "Paired comparison: prefix − full" in (sweep_dir / "summary" / "report.html").read_text()
