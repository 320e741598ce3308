"""A run's life across interruptions, with real processes: SIGTERM / SIGUSR1 save and exit non-zero, `resume=<run
dir>` goes on to the uninterrupted run's prefix, the timed last checkpoint bounds what kill -9 loses, SLURM's
requeue stays Lightning's, and a damaged checkpoint is named with the intact one beside it."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from prefix_lightning.training.checks import ConfigError
from prefix_lightning.training.csv_log import ContinuedCSVLogger
from prefix_lightning.training.last_checkpoint import LastCheckpoint
from prefix_lightning.training.resume import STARTED_CONFIG, check_earlier_attempt, resume_arguments
from prefix_lightning.training.train import train
from tests.helpers.cli import run_cli, run_failing, run_python
from tests.helpers.config import compose_train, run_folder
from tests.helpers.faults import fault

# Two epochs of 4 batches, validating every 2 steps; the last step's prefix is exported (it changes every step).
RUN = ["model=tiny_llama", "debug=fast", "export=last", "trainer.max_steps=8", "trainer.val_check_interval=2"]


def assert_same_prefix(run: Path, reference: Path) -> None:
    got, expected = (
        load_file(run / "prefix" / "prefix.safetensors"),
        load_file(reference / "prefix" / "prefix.safetensors"),
    )
    assert got.keys() == expected.keys()
    for group in expected:
        torch.testing.assert_close(got[group], expected[group], atol=1e-6, rtol=0)


def assert_restored(log: subprocess.CompletedProcess, checkpoint: Path) -> None:
    """The attempt went on from ``checkpoint``: a run trained again from step 0 would end with the same prefix, test
    outputs and validation files as the uninterrupted run (it is deterministic), so those alone do not show it."""
    assert f"Restored all states from the checkpoint at {checkpoint}" in log.stdout + log.stderr


def logged_learning_rates(run: Path) -> list[tuple[int, float]]:
    """(logged step, learning rate) in the order logged: a resumed run adds its rows after its earlier attempts'."""
    with (run / "csv" / "metrics.csv").open() as rows:
        return [(int(row["step"]), float(row["lr-AdamW"])) for row in csv.DictReader(rows) if row["lr-AdamW"]]


def learning_rates(run: Path) -> dict[int, float]:
    """The logged learning rate by logged step: a resumed run logs the steps it trained as the straight run did."""
    return dict(logged_learning_rates(run))


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_cli(run_dir, *RUN)
    return run_dir


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "step", "validation", "saved"),
    [
        ("SIGTERM", 3, 2, 3),  # mid-epoch, between validations: stops after that step
        ("SIGUSR1", 3, 2, 3),
        ("SIGINT", 3, 2, 3),  # Ctrl-C
        ("SIGTERM", 4, 3, 5),  # an epoch's last step, not validated: stops after the next epoch's first step
        ("SIGTERM", 2, 2, 2),  # a validated step mid-epoch: stops after its validation, which runs whole
        # (an epoch's last step that is validated stops after the validation: see the test below)
    ],
)
def test_a_stop_signal_saves_exits_non_zero_and_resume_ends_with_the_uninterrupted_prefix(
    name: str, step: int, validation: int, saved: int, straight: Path, tmp_path: Path
) -> None:
    """Stopped (4 steps an epoch), then `run.py resume=<run dir>` and nothing else. Validation does not change the
    training, so the uninterrupted run validating every 2 steps ends with the same prefix."""
    run = [*RUN, f"trainer.val_check_interval={validation}"]
    result = run_failing(tmp_path, *run, *fault("SignalAt", step=step, name=name))
    assert result.returncode == 128 + getattr(signal, name).value
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert global_step(last) == saved
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"stopped by {name} (saved {last}); to go on, run: python run.py resume={tmp_path}"
    # One line says which signal stopped the run: not Lightning's "Received SIGTERM" for a Ctrl-C handed to it, nor
    # its note of a default at every save.
    assert "Received SIGTERM" not in result.stdout + result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "result.json").exists()

    computes_nothing = "callbacks.progress_bar.refresh_rate=5"
    log = run_cli(tmp_path, f"resume={tmp_path}", computes_nothing)
    assert f"Restored all states from the checkpoint at {last}" in log.stdout + log.stderr
    assert "not resumable" not in log.stdout + log.stderr  # mid-epoch: our loaders do resume there
    assert_same_prefix(tmp_path, straight)
    assert learning_rates(tmp_path) == learning_rates(straight)  # metrics.csv holds the rows of both attempts
    if validation == 2:  # the straight run's validations, each one whole
        for metrics in straight.glob("val_step*_metrics.json"):
            assert (tmp_path / metrics.name).read_text() == metrics.read_text()
    assert (tmp_path / ".hydra" / "resumed" / "config.yaml").is_file()  # the run's own .hydra/config.yaml is kept
    assert "SignalAt" in (tmp_path / ".hydra" / "config.yaml").read_text()


@pytest.mark.integration
def test_a_run_given_its_output_folder_names_the_folder_that_resumes_it(tmp_path: Path) -> None:
    """With paths.output_dir, the outputs and checkpoints go there and Hydra's config into hydra.run.dir: the stop
    names the folder resume= reads (the outputs' one is no run folder to it), which goes on in the outputs'."""
    hydra_dir, outputs = tmp_path / "hydra", tmp_path / "outputs"
    result = run_failing(hydra_dir, *RUN, f"paths.output_dir={outputs}", *fault("SignalAt", step=3, name="SIGTERM"))
    last = outputs / "checkpoints" / "last.ckpt"
    assert result.stderr.splitlines()[-1].endswith(f"(saved {last}); to go on, run: python run.py resume={hydra_dir}")
    assert_restored(run_cli(hydra_dir, f"resume={hydra_dir}"), last)
    assert (outputs / "result.json").is_file()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("budget", "stop", "saved"),
    [
        # Two batches a step, SIGTERM after the first: the run stops after the second (a checkpoint between them
        # would lose the first batch's gradients).
        (
            ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.accumulate_grad_batches=2"],
            fault("SignalAtBatch", batch=0, name="SIGTERM"),
            1,
        ),
        # Two epochs of 4 steps as the budget, stopped in the second: the resumed run trains that epoch's remaining
        # batches (with a budget in epochs Lightning builds the training loader before it restores the loops).
        (
            ["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.val_check_interval=null"],
            fault("SignalAt", step=6, name="SIGTERM"),
            6,
        ),
        # The same with a loader worker process, which is handed its indices from the sampler when the epoch's
        # iterator starts (after the restore, as the sampler's own first pass).
        (
            ["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.val_check_interval=null", "data.num_workers=1"],
            fault("SignalAt", step=6, name="SIGTERM"),
            6,
        ),
    ],
    ids=["mid-accumulation", "epoch-budget", "epoch-budget-worker"],
)
def test_a_stopped_run_resumes_as_the_uninterrupted_run(
    budget: list[str], stop: list[str], saved: int, tmp_path: Path
) -> None:
    settings = [*RUN[:3], *budget]
    straight = tmp_path / "straight"
    run_cli(straight, *settings)
    stopped = tmp_path / "stopped"
    result = run_failing(stopped, *settings, *stop)
    assert result.returncode == 128 + signal.SIGTERM.value
    assert global_step(stopped / "checkpoints" / "last.ckpt") == saved
    assert_restored(run_cli(stopped, f"resume={stopped}"), stopped / "checkpoints" / "last.ckpt")
    assert_same_prefix(stopped, straight)


@pytest.mark.integration
def test_sigterm_during_a_validation_lets_it_finish_then_stops(straight: Path, tmp_path: Path) -> None:
    """SIGTERM inside the validation after step 4 (an epoch's end): that validation finishes (stopped in its middle,
    Lightning would resume without it), then the run stops; resumed, it has the uninterrupted run's validation
    scores and generations, test outputs and prefix."""
    result = run_failing(tmp_path, *RUN, *fault("SignalInValidation", step=4, name="SIGTERM"))
    assert result.returncode == 143
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 4
    assert (tmp_path / "val_step4_metrics.json").is_file()
    assert_restored(run_cli(tmp_path, f"resume={tmp_path}"), tmp_path / "checkpoints" / "last.ckpt")
    for name in ("val_step4_metrics.json", "val_step4_generations.txt", "test_generations.txt"):
        assert (tmp_path / name).read_text() == (straight / name).read_text()
    assert_same_prefix(tmp_path, straight)


@pytest.mark.integration
def test_killed_in_the_test_resume_exports_and_tests_as_the_uninterrupted_run(straight: Path, tmp_path: Path) -> None:
    """kill -9 in the test, training done: resumed, Lightning skips the finished training (and its on_train_end);
    the export and the test still run on the weights the uninterrupted run exported."""
    result = run_failing(tmp_path, *RUN, *fault("SignalInTest", name="SIGKILL"))
    assert result.returncode == -signal.SIGKILL
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 8
    assert_restored(run_cli(tmp_path, f"resume={tmp_path}"), tmp_path / "checkpoints" / "last.ckpt")
    record = json.loads((tmp_path / "result.json").read_text())
    assert (record["export"], record["exported_step"]) == ("last", 8)
    assert (tmp_path / "test_generations.txt").read_text() == (straight / "test_generations.txt").read_text()
    assert_same_prefix(tmp_path, straight)


@pytest.mark.integration
def test_killed_in_the_test_resumed_without_test_says_how_to_export(straight: Path, tmp_path: Path) -> None:
    """The same kill, resumed with test=false: nothing runs after the skipped training, so nothing is exported; the
    log gives the export command, and that command writes the uninterrupted run's prefix."""
    run_failing(tmp_path, *RUN, *fault("SignalInTest", name="SIGKILL"))
    resumed = run_cli(tmp_path, f"resume={tmp_path}", "test=false")
    said = resumed.stdout + resumed.stderr
    command = re.search(r"export with: python -m (prefix_lightning\.export) (\S+) (\S+) (--overwrite)", said)
    assert command is not None, said[-3000:]
    assert (Path(command[2]), Path(command[3])) == (tmp_path / "checkpoints" / "last.ckpt", tmp_path / "prefix")
    assert json.loads((tmp_path / "result.json").read_text())["export"] is None
    exported = run_python("-m", *command.groups())
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert_same_prefix(tmp_path, straight)


@pytest.mark.integration
def test_kill_9_after_the_timed_checkpoint_loses_no_more_than_the_interval(straight: Path, tmp_path: Path) -> None:
    """Steps of at least 0.25 s, a timed last.ckpt every 0.6 s and no validation before step 8: kill -9 after step 7
    finds a checkpoint at most 0.6 s (3 steps) plus the step it waited for old, and resuming from it still ends with
    the uninterrupted run's prefix, validating at step 8 and logging each step as the uninterrupted run did."""
    timed = [*RUN[:-1], "trainer.val_check_interval=8", "callbacks.last_checkpoint.every_minutes=0.01"]
    result = run_failing(
        tmp_path, *timed, *fault("SlowSteps", seconds=0.25), *fault("SignalAt", step=7, name="SIGKILL")
    )
    assert result.returncode == -9
    saved = global_step(tmp_path / "checkpoints" / "last.ckpt")
    assert 7 - saved <= math.ceil(0.6 / 0.25) + 1 and saved >= 1
    assert re.search(r"saved \S+last\.ckpt at step \d+ \(every 0\.01 minutes\)", result.stdout + result.stderr)
    log = run_cli(tmp_path, *timed, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert_restored(log, tmp_path / "checkpoints" / "last.ckpt")
    assert_same_prefix(tmp_path, straight)
    assert [path.name for path in tmp_path.glob("val_step*_metrics.json")] == ["val_step8_metrics.json"]
    resumed, expected = learning_rates(tmp_path), learning_rates(straight)
    assert resumed == {step: expected[step] for step in resumed}
    # The resumed attempt logs from the step it resumed at (the killed one's last rows may never have been written).
    assert [step for step, _ in logged_learning_rates(tmp_path)][saved - 8 :] == list(range(saved, 8))


@pytest.mark.integration
def test_a_timed_checkpoint_due_in_the_middle_of_a_step_waits_for_the_next_step(tmp_path: Path) -> None:
    """Two batches a step, a timed last.ckpt every 1.2 s, and a pause after batch 2 (the first of step 2): the timer
    falls due as batch 3 starts, in the middle of step 2, and the checkpoint waits for step 3's first batch. Taken
    there it would hold step 1 without batch 2's accumulated gradients: resumed, the run ended with another prefix
    than the uninterrupted one."""
    settings = [*RUN[:3], "data.batch_size=2", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2"]
    settings += ["trainer.val_check_interval=8", "callbacks.last_checkpoint.every_minutes=0.02"]  # no validation
    straight = tmp_path / "straight"
    run_cli(straight, *settings)
    killed = tmp_path / "killed"
    pause = fault("PauseAfterBatch", batch=2, seconds=1.5)
    result = run_failing(killed, *settings, *pause, *fault("SignalAtBatch", batch=4, name="SIGKILL"))
    assert result.returncode == -signal.SIGKILL
    last = killed / "checkpoints" / "last.ckpt"
    assert global_step(last) == 2
    assert_restored(run_cli(killed, *settings, f"ckpt_path={last}"), last)
    assert_same_prefix(killed, straight)


@pytest.mark.integration
def test_the_timer_does_not_save_a_step_already_saved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A timed last.ckpt as every batch starts (every_minutes=0), validating every 2 steps: the timer saves the odd
    steps once each, not step 0 (where training starts) nor the even ones again (their validation saved them)."""
    timer = "callbacks.last_checkpoint.every_minutes=0"
    cfg = compose_train(tmp_path, [*RUN, timer, "test=false"])
    caplog.set_level(logging.INFO, logger="prefix_lightning.training.last_checkpoint")
    train(cfg)
    timed = re.findall(r"saved \S+last\.ckpt at step (\d+) \(every 0 minutes\)", caplog.text)
    assert timed == ["1", "3", "5", "7"]
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 8


def _trained_batches(run_dir: Path, *overrides: str) -> list[list[list[int]]]:
    """train(cfg) in ``run_dir`` validating at every epoch's end (4 batches), and the batches it trained on."""
    every_epoch = ["trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1"]
    recorder = [
        "+callbacks.batches._target_=tests.helpers.recorders.BatchRecorder",
        f"+callbacks.batches.folder={run_dir}",
    ]
    train(compose_train(run_dir, [*RUN[:3], *every_epoch, "test=false", "logger=none", *recorder, *overrides]))
    return json.loads((run_dir / "rank0.json").read_text())


@pytest.mark.integration
def test_a_run_started_from_an_epoch_end_checkpoint_resumes_mid_epoch_in_its_own_order(tmp_path: Path) -> None:
    """Validating at every epoch's end, the best checkpoint is written as the epoch ends (after Lightning counted
    it processed, before it counted it completed). A run started from it keeps the two counts one apart, and the
    sampler's epoch is Lightning's processed count: stopped in the middle of an epoch and resumed, the run goes on
    with the batches it would have trained uninterrupted (taking the completed count, it drew another epoch's)."""
    _trained_batches(tmp_path / "first", "trainer.max_steps=4")
    epoch_end = tmp_path / "first" / "checkpoints" / "step4.ckpt"
    uninterrupted = _trained_batches(tmp_path / "uninterrupted", "trainer.max_steps=8", f"ckpt_path={epoch_end}")
    timed = "callbacks.last_checkpoint.every_minutes=0"  # saved as each step starts: step 5 as step 6 starts
    _trained_batches(tmp_path / "stopped", "trainer.max_steps=6", f"ckpt_path={epoch_end}", timed)
    mid_epoch = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert global_step(mid_epoch) == 5
    resumed = _trained_batches(tmp_path / "resumed", "trainer.max_steps=8", f"ckpt_path={mid_epoch}")
    assert resumed == uninterrupted[1:]


@pytest.mark.integration
def test_slurm_keeps_lightnings_own_requeue_on_sigusr1(tmp_path: Path) -> None:
    """Under SLURM (auto-requeue), SIGUSR1 is Lightning's: it writes hpc_ckpt_1.ckpt and asks scontrol to requeue
    (absent here: it only warns), and the run goes on to its end, as SLURM then stops and restarts the job."""
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "prefix", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    run_cli(tmp_path, *RUN, *fault("SignalAt", step=3, name="SIGUSR1"), env=slurm)
    assert global_step(tmp_path / "hpc_ckpt_1.ckpt") == 3
    assert (tmp_path / "result.json").is_file()


@pytest.mark.integration
def test_a_truncated_checkpoint_is_named_with_the_newest_intact_one(tmp_path: Path) -> None:
    run_cli(tmp_path, *RUN, "callbacks.model_checkpoint.save_top_k=-1")
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a full disk or a killed copy
    for given in (f"ckpt_path={last}", f"resume={tmp_path}"):
        (tmp_path / "result.json").unlink(missing_ok=True)
        result = (
            run_failing(tmp_path / "again", *RUN, given) if given.startswith("ckpt") else run_failing(tmp_path, given)
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith(f"error: checkpoint {last} cannot be used: it is truncated or not a checkpoint")
        assert f"the newest intact checkpoint there is {tmp_path / 'checkpoints' / 'step8.ckpt'}" in lines[-1]
        assert "Errno 22" not in result.stderr


def test_a_signal_that_comes_while_the_ranks_agree_stops_them_at_the_next_point(tmp_path: Path) -> None:
    """A rank waits in the agreement for the others, and a signal handed to it by another process (a scheduler,
    trainer=ddp_cpu's main process) arrives in that wait, after the rank said it had none: the run stops at the
    next point, not never."""
    checkpoint = LastCheckpoint(str(tmp_path))
    stops: list[str] = []

    def agree(stopping: bool, all: bool) -> bool:
        checkpoint._pending = lambda: stops.append("stop")  # what the signal handler leaves for the next point
        return stopping

    ranks = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=agree))
    checkpoint._hand_over(ranks)  # type: ignore[arg-type]
    assert stops == []
    checkpoint._hand_over(ranks)  # type: ignore[arg-type]
    assert stops == ["stop"]


def test_resume_takes_the_runs_own_overrides_and_folder(tmp_path: Path) -> None:
    """Sweep job folders are named by their overrides: the path reaches Hydra quoted."""
    run = run_folder(
        tmp_path / "data.train_size=50,prefix.length=5", "seed: 1\n", ["model=tiny_llama", "prefix.length=5"]
    )
    argv = resume_arguments(["run.py", f"resume={run}", "trainer.devices=2"])
    assert argv == [
        "run.py",
        "model=tiny_llama",
        "prefix.length=5",
        "trainer.devices=2",
        f"hydra.run.dir='{run}'",
        "hydra.output_subdir=.hydra/resumed",
        f"resume='{run}'",
    ]
    assert resume_arguments(["run.py", f"resume='{run}'"])[-1] == f"resume='{run}'"
    # Hydra's flags go last: its parser reads the overrides in one run (--cfg job in the middle cut them off).
    flagged = resume_arguments(["run.py", "--cfg", "job", f"resume={run}", "trainer.devices=2", "--info", "config"])
    assert flagged == [*argv, "--cfg", "job", "--info", "config"]
    # DDP and FSDP start the other ranks with this command line, which Lightning extends: taken as it is.
    relaunched = [*argv, f"hydra.run.dir='{run}'", "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    assert resume_arguments(relaunched) == relaunched
    # A run started from another run's checkpoint goes on from its own last one, not from that checkpoint again.
    started_from = run_folder(tmp_path / "started", "seed: 1\n", ["model=tiny_llama", "ckpt_path=/runs/a/last.ckpt"])
    assert resume_arguments(["run.py", f"resume={started_from}"])[1:-3] == ["model=tiny_llama"]
    with pytest.raises(
        FileNotFoundError, match=r"resume=.*nowhere: not a run folder \(\.hydra/config\.yaml is missing"
    ):
        resume_arguments(["run.py", f"resume={tmp_path / 'nowhere'}"])
    (tmp_path / "outputs" / "checkpoints").mkdir(parents=True)  # a run's paths.output_dir: its config is elsewhere
    with pytest.raises(FileNotFoundError, match=r"holds a run's outputs \(paths.output_dir\); resume the folder its"):
        resume_arguments(["run.py", f"resume={tmp_path / 'outputs'}"])


def test_resume_with_another_choice_of_a_group_keeps_the_runs_settings_it_composes_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run's settings inside a group given another choice are its own (its budget) and stay; one the new choice
    lacks would stop Hydra (``data.tasks`` is not in e2e_devsplit's config): it is left out, saying so, and the
    attempt's check lists what the new choice changes. Settings a resumed run may change are the new choice's."""
    mixture = ["data=multi", "data.tasks=[e2e_devsplit,webnlg]", "data.train_size=8"]
    budget = ["trainer.max_steps=40", "trainer.val_check_interval=10"]
    run = run_folder(
        tmp_path / "run",
        "seed: 1\n",
        ["model=tiny_llama", *mixture, *budget, "trainer.strategy=ddp", "prefix.length=5"],
    )
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      data: multi\n      model: tiny_llama\n      trainer: cpu\n"
    )
    with caplog.at_level(logging.WARNING, logger="prefix_lightning.training.resume"):
        argv = resume_arguments(["run.py", f"resume={run}", "data=e2e_devsplit", "trainer=ddp_cpu", "model=tiny_llama"])
    given = ["data=e2e_devsplit", "trainer=ddp_cpu", "model=tiny_llama"]
    assert argv[1:-3] == ["model=tiny_llama", "data.train_size=8", *budget, "prefix.length=5", *given]
    assert caplog.messages == [
        "left out the run's data.tasks=[e2e_devsplit,webnlg], which Hydra does not compose with "
        "data=e2e_devsplit trainer=ddp_cpu"
    ]
    composed = compose_train(tmp_path, argv[1:-3])
    assert (composed.data.dataset, composed.data.train_size) == ("e2e", 8)
    assert (composed.trainer.max_steps, composed.trainer.val_check_interval) == (40, 10)
    assert composed.trainer.strategy._target_ == "prefix_lightning.training.spawn.SpawnDDPStrategy"
    assert resume_arguments(["run.py", f"resume={run}", "data=multi"])[1:-4] == [
        "model=tiny_llama",
        *mixture,
        *budget,
        "trainer.strategy=ddp",
        "prefix.length=5",
    ]


def test_resume_composes_a_new_choice_from_the_runs_own_config_folder(tmp_path: Path) -> None:
    """A choice in a folder of the user's (the run's hydra.searchpath) composes with the run's settings too."""
    own = tmp_path / "conf" / "data" / "mine.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("defaults:\n  - e2e_devsplit\n  - _self_\ntrain_size: 12\n")
    run = run_folder(tmp_path / "run", "seed: 1\n", ["data=multi", "data.tasks=[webnlg,mine]", "data.train_size=8"])
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  searchpath:\n  - file://{own.parents[1]}\n  runtime:\n    choices:\n      data: multi\n"
    )
    argv = resume_arguments(["run.py", f"resume={run}", "data=mine"])
    assert argv[1:-3] == ["data.train_size=8", f"hydra.searchpath=['file://{own.parents[1]}']", "data=mine"]
    # Given relative to the folder the run started in (file://conf), it is found from any other.
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  searchpath:\n  - file://conf\n  runtime:\n    cwd: {tmp_path}\n    choices:\n      data: multi\n"
    )
    argv = resume_arguments(["run.py", f"resume={run}", "data=mine"])
    assert argv[1:-3] == ["data.train_size=8", f"hydra.searchpath=['file://{own.parents[1]}']", "data=mine"]


@pytest.mark.integration
def test_a_run_resumed_with_another_trainer_choice_trains_its_own_budget(straight: Path, tmp_path: Path) -> None:
    """Stopped, then resumed with the spawning strategy (trainer=ddp_cpu, one process: their number sets the global
    batch): the run's trainer.max_steps and val_check_interval stay (debug=fast's were composed, and refused), so it
    ends with the uninterrupted run's prefix."""
    run_failing(tmp_path, *RUN, *fault("SignalAt", step=3, name="SIGTERM"))
    resumed = run_cli(tmp_path, f"resume={tmp_path}", "trainer=ddp_cpu", "trainer.devices=1")
    assert_restored(resumed, tmp_path / "checkpoints" / "last.ckpt")
    assert "left out" not in resumed.stderr
    assert_same_prefix(tmp_path, straight)
    assert sorted(path.name for path in tmp_path.glob("val_step*_metrics.json")) == sorted(
        path.name for path in straight.glob("val_step*_metrics.json")
    )


def test_resume_refuses_settings_that_change_the_computation_and_lists_them(tmp_path: Path) -> None:
    run = ["model=tiny_llama", "prefix.length=5"]
    check_earlier_attempt(compose_train(tmp_path, run))  # the run starts from nothing: its config is kept
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, last)  # and is stopped
    allowed = [
        "trainer.accelerator=cpu",
        "logger=tensorboard",
        "paths.data_dir=/elsewhere",
        "data.num_workers=2",
        "test=false",
    ]
    check_earlier_attempt(compose_train(tmp_path, [*run, *allowed, f"resume={tmp_path}"]))
    changed = compose_train(
        tmp_path,
        [*run, "prefix.length=3", "method.lr=0.1", "model.separator=:", "trainer.devices=2", f"resume={tmp_path}"],
    )
    with pytest.raises(ConfigError) as refused:
        check_earlier_attempt(changed)
    # The run's own values as the command line takes them back (a new trainer= choice brings its own devices).
    assert str(refused.value) == (
        f"resume={tmp_path}: these settings differ from the run's own (.hydra/started_config.yaml) and change what "
        "it computes: method.lr: 0.0005 -> 0.1; model.separator: ' <|endoftext|>' -> ':'; prefix.length: 5 -> 3; "
        "trainer.devices: 1 -> 2. Resume without them, or start a new run (the run's own: method.lr=0.0005 "
        "model.separator=' <|endoftext|>' prefix.length=5 trainer.devices=1)"
    )
    # A run folder from before started_config.yaml: its .hydra/config.yaml (resumed attempts write theirs elsewhere).
    (tmp_path / STARTED_CONFIG).rename(tmp_path / ".hydra" / "config.yaml")
    with pytest.raises(ConfigError, match=re.escape("own (.hydra/config.yaml) and change what it computes: method")):
        check_earlier_attempt(changed)
    assert not (tmp_path / STARTED_CONFIG).exists()  # an attempt that goes on from another one writes none


@pytest.mark.integration
def test_a_run_resumed_after_its_last_step_logs_as_the_straight_run(straight: Path, tmp_path: Path) -> None:
    """Stopped in its test, a run resumes from the checkpoint of its last validation, which Lightning wrote before
    counting that step for its loggers: the resumed test logged one step early, and metrics.csv, continued from
    there, lost the first attempt's last training loss and validation."""
    run_cli(tmp_path, *RUN)
    for finished in (tmp_path / "result.json", *tmp_path.glob("test_*")):
        finished.unlink()  # as a stop during the test leaves the folder
    log = run_cli(tmp_path, f"resume={tmp_path}")
    assert_restored(log, tmp_path / "checkpoints" / "last.ckpt")
    assert _logged_columns(tmp_path) == _logged_columns(straight)


def _logged_columns(run: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(step, the columns with a value) of each row of metrics.csv."""
    with (run / "csv" / "metrics.csv").open() as file:
        return [(int(row["step"]), tuple(sorted(k for k, v in row.items() if v))) for row in csv.DictReader(file)]


def _logged(folder: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    with (folder / "csv" / "metrics.csv").open() as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), [(row["step"], row["loss"], row["lr"]) for row in reader]


def test_metrics_csv_keeps_the_earlier_attempts_rows_before_the_step_an_attempt_starts_from(tmp_path: Path) -> None:
    killed = ContinuedCSVLogger(tmp_path, name="csv", version="")
    for step in range(4):
        killed.log_metrics({"loss": float(step)}, step)
    killed.log_metrics({"val/loss": 9.0}, 3)
    killed.save()
    resumed = ContinuedCSVLogger(tmp_path, name="csv", version="")  # from the checkpoint of step 2
    resumed.log_metrics({"loss": 20.0, "lr": 0.5}, 2)
    resumed.save()
    resumed.log_metrics({"loss": 30.0}, 3)
    resumed.save()  # not this attempt's first rows: the ones it wrote stay (appended)
    header, rows = _logged(tmp_path)
    assert header == ["loss", "lr", "step", "val/loss"]
    assert rows == [("0", "0.0", ""), ("1", "1.0", ""), ("2", "20.0", "0.5"), ("3", "30.0", "")]
    resumed.log_metrics({"lr": 0.25, "test/bleu": 7.0}, 4)  # a new column: the file is written again
    resumed.save()
    resumed.log_metrics({"loss": 50.0}, 5)
    resumed.save()
    header, rows = _logged(tmp_path)
    assert header == ["loss", "lr", "step", "test/bleu", "val/loss"]
    assert rows[3:] == [("3", "30.0", ""), ("4", "", "0.25"), ("5", "50.0", "")]

    afresh = ContinuedCSVLogger(tmp_path, name="csv", version="")  # the same folder, no checkpoint: from step 0
    afresh.log_metrics({"loss": 5.0}, 0)
    afresh.save()
    assert _logged(tmp_path)[1] == [("0", "5.0", "")]


def test_a_run_started_before_its_callbacks_moved_module_still_resumes(tmp_path: Path) -> None:
    run = ["model=tiny_llama", "prefix.length=5"]
    check_earlier_attempt(compose_train(tmp_path, run))
    started = (tmp_path / STARTED_CONFIG).read_text()
    for moved in ("method_export.MethodExport", "early_stopping.early_stopping", "result_record.ResultRecord"):
        assert f"prefix_lightning.training.{moved}\n" in started
        started = started.replace(f"prefix_lightning.training.{moved}\n", f"{OLD_CALLBACKS}.{moved.split('.')[1]}\n")
    (tmp_path / STARTED_CONFIG).write_text(started)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 3}, last)
    check_earlier_attempt(compose_train(tmp_path, [*run, f"resume={tmp_path}"]))  # resumes with today's callbacks
    moved = compose_train(tmp_path, [*run, "callbacks.export._target_=tests.Other", f"resume={tmp_path}"])
    with pytest.raises(ConfigError, match=re.escape("export._target_: 'prefix_lightning.training.method_export.Meth")):
        check_earlier_attempt(moved)  # another class still counts


# Where the run's callbacks lived until they got a module each.
OLD_CALLBACKS = "prefix_lightning.training.callbacks"
