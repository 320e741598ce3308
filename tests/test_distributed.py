"""Scaling out by config: real CPU data parallelism (spawned and re-launched), and the sharded/cluster configs
that need GPUs or a cluster, checked as far as this machine allows."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_lightning import PrefixConfig, PrefixModel
from prefix_lightning.data import sampler as sampler_module
from prefix_lightning.data.sampler import EpochShuffleSampler, training_sampler
from prefix_lightning.decoding.steps import static_steps_pay
from prefix_lightning.training.build import build_model
from prefix_lightning.training.method_export import MethodExport
from prefix_lightning.training.module import MethodModule
from prefix_lightning.training.result_record import ResultRecord
from prefix_lightning.training.sharded import clip_sharded_grad_norm, fsdp_gathered
from prefix_lightning.training.spawn import SpawnDDPStrategy
from tests.helpers.cli import run_cli, run_failing, run_python
from tests.helpers.config import compose_train
from tests.helpers.faults import fault
from tests.helpers.tiny import ROWS, pad_batch, tiny_lm

# Two optimizer steps per epoch of the 16-pair subset (global batch 8).
RUN = [
    "model=tiny_llama",
    "debug=fast",
    "data.train_size=16",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "test=false",
    "+callbacks.batch_recorder._target_=tests.helpers.recorders.BatchRecorder",
]


def _train(run_dir: Path, *overrides: str) -> Path:
    run_cli(run_dir, *RUN, f"+callbacks.batch_recorder.folder={run_dir / 'batches'}", *overrides)
    return run_dir


def _seen(run_dir: Path, rank: int) -> list[list[tuple[int, ...]]]:
    batches = json.loads((run_dir / "batches" / f"rank{rank}.json").read_text())
    return [[tuple(row) for row in batch] for batch in batches]


def _last_val_loss(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as file:
        return [float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")][-1]


@pytest.mark.integration
def test_two_process_ddp_splits_the_subset_and_matches_one_process(tmp_path: Path, data_dir: Path) -> None:
    """2 spawned gloo processes x batch 4 train like 1 process x batch 8: step by step, the ranks' batches are
    disjoint halves of the single process's batch; a prefix-only checkpoint, nearly the same prefix and the same
    synced validation loss."""
    ddp = _train(tmp_path / "ddp", "trainer=ddp_cpu", "data.batch_size=4")
    single = _train(tmp_path / "single", "data.batch_size=8")
    record = json.loads((ddp / "result.json").read_text())
    assert record["train_steps"] == record["exported_step"] == record["best_val_step"] == 3
    assert record["best_val"] is not None
    assert record["train_tokens"] == json.loads((single / "result.json").read_text())["train_tokens"] > 0

    rank0, rank1, steps = _seen(ddp, 0), _seen(ddp, 1), _seen(single, 0)
    assert len(rank0) == len(rank1) == len(steps) == 3
    assert len(set(steps[0]) | set(steps[1])) == 16, "the first epoch's two batches cover the subset"
    for half0, half1, whole in zip(rank0, rank1, steps, strict=True):
        assert len(half0) == len(half1) == 4
        assert not set(half0) & set(half1), "the ranks must train on different examples"
        assert set(half0) | set(half1) == set(whole), "together the ranks train on the single run's batch"

    checkpoint = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"] and all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])

    # Each rank averages over its own target tokens, one process over all of them, and Adam's first steps are
    # nearly sign(gradient): the two runs move the prefix the same way, not by bit-identical amounts.
    model, _ = build_model(compose_train(tmp_path, RUN))
    with torch.no_grad():
        start = {f"{g}.{i}": block for g, encoder in model.encoders.items() for i, block in enumerate(encoder())}
    ddp_prefix, single_prefix = (load_file(run / "prefix" / "prefix.safetensors") for run in (ddp, single))
    for group in model.encoders:
        names = [name for name in start if name.startswith(f"{group}.")]
        ddp_move, single_move = (
            torch.cat([(prefix[name] - start[name]).flatten() for name in names])
            for prefix in (ddp_prefix, single_prefix)
        )
        assert torch.cosine_similarity(ddp_move, single_move, dim=0) > 0.95
        assert (ddp_move - single_move).norm() < 0.3 * single_move.norm()
    assert _last_val_loss(ddp) == pytest.approx(_last_val_loss(single), rel=1e-3)  # synced across the ranks

    # The logged training loss is the ranks' mean (whose gradient DDP averages), not rank 0's share.
    own = [json.loads((ddp / "batches" / f"rank{rank}_losses.json").read_text()) for rank in (0, 1)]
    with open(ddp / "csv" / "metrics.csv") as file:
        logged = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert own[0] != own[1]
    assert logged == pytest.approx([(loss0 + loss1) / 2 for loss0, loss1 in zip(*own, strict=True)], rel=1e-6)


# Two epochs of 2 global batches of 8 (4 per process), validating after each; the test runs after the fit.
SHARDED_RUN = [
    "model=tiny_llama",
    "debug=fast",
    "data.train_size=16",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
]


SHARDED = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.mark.integration
def test_two_process_fsdp_stops_resumes_and_ends_as_ddp_does(tmp_path: Path, data_dir: Path) -> None:
    """FSDP (each process holding half of every unit, gloo on the CPU) stopped by SIGTERM after its first step and
    resumed with ``resume=``: it ends with DDP's prefix, test score and checkpoint (the prefix alone, whole, with
    DDP's optimizer state); the test after the fit runs in the fit's wrapping."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_cli(ddp, *SHARDED_RUN, "trainer=ddp_cpu", "trainer.strategy=ddp")
    run_failing(fsdp, *SHARDED_RUN, *SHARDED, *fault("SignalAt", step=1, name="SIGTERM"))
    assert torch.load(fsdp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    resumed = run_cli(fsdp, f"resume={fsdp}")  # the second process is started again with this command line
    console = resumed.stdout + resumed.stderr
    # Nothing on the console may read as if the prefix or the scores lived on one rank: Lightning's summary of
    # rank 0's shard, clipping's warning on a rank without a slice of the prefix, the per-rank metric warning.
    for rank_local in ("Trainable params:", "with no gradients", "sync_dist=True"):
        assert rank_local not in console

    exported, expected = (load_file(run / "prefix" / "prefix.safetensors") for run in (fsdp, ddp))
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-6, rtol=0)
    assert _test_bleu(fsdp) == _test_bleu(ddp)
    tokens = [json.loads((run / "result.json").read_text())["train_tokens"] for run in (fsdp, ddp)]
    assert tokens[0] == tokens[1], "the resumed run counts the tokens of both ranks before the stop, once"
    assert all(key.startswith("model.encoders.") for key in _assert_same_checkpoint(fsdp, ddp))


@pytest.mark.integration
def test_two_process_fsdp_records_every_trainable_parameter(tmp_path: Path, data_dir: Path) -> None:
    """result.json and the model card rewritten after the test count the whole prefix, not rank 0's shard of it."""
    run_cli(tmp_path, *SHARDED_RUN, "trainer.max_steps=2", *SHARDED)
    model, _ = build_model(compose_train(tmp_path, SHARDED_RUN))
    whole = sum(p.numel() for p in model.trainable_parameters())
    assert json.loads((tmp_path / "result.json").read_text())["trainable_params"] == whole
    assert f"| trainable parameters | {whole:,} |" in (tmp_path / "prefix" / "README.md").read_text()


@pytest.mark.integration
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path, data_dir: Path) -> None:
    """A scheduler's signal reaches the processes at different steps; here rank 1 alone gets SIGTERM after step 1.
    Every rank stops there (rank 0 alone going on paired its next step's gradient exchange with rank 1's save),
    and the run resumes to the uninterrupted run's prefix."""
    ddp, stopped = tmp_path / "ddp", tmp_path / "stopped"
    relaunched = ["trainer=ddp_cpu", "trainer.strategy=ddp"]
    run_cli(ddp, *SHARDED_RUN, *relaunched)
    result = run_python(
        "run.py",
        f"hydra.run.dir={stopped}",
        *SHARDED_RUN,
        *relaunched,
        *fault("SignalAt", step=1, name="SIGTERM", rank=1),
        timeout=240,
    )
    assert result.returncode != 0
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    run_cli(stopped, f"resume={stopped}")
    exported, expected = (load_file(run / "prefix" / "prefix.safetensors") for run in (stopped, ddp))
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_a_signal_to_the_spawning_process_stops_its_workers_as_one_process_stops(
    tmp_path: Path, data_dir: Path
) -> None:
    """trainer=ddp_cpu: SIGTERM after step 1 to the main process, which only waits for its two spawned workers. It
    hands the signal to them; they stop after that step and save, and it exits as one process does (143, saying how
    to go on). Resumed, the run ends with the uninterrupted run's prefix."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    console = run_cli(straight, *SHARDED_RUN, "trainer=ddp_cpu").stdout
    # What the workers log reaches run.log and the console, as one process's does (it reached neither).
    for line in ("exported best weights", "test over 4 inputs", "result record"):
        assert line in (straight / "run.log").read_text() and line in console
    assert (straight / "train_ddp_process_1.log").is_file()
    result = run_failing(stopped, *SHARDED_RUN, "trainer=ddp_cpu", *fault("SignalMainAt", step=1, name="SIGTERM"))
    assert result.returncode == 143
    last = stopped / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"stopped by SIGTERM (saved {last}); to go on, run: python run.py resume={stopped}"
    assert not (stopped / "prefix").exists()
    resumed = run_cli(stopped, f"resume={stopped}")
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    exported, expected = (load_file(run / "prefix" / "prefix.safetensors") for run in (stopped, straight))
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_ctrl_c_at_a_terminal_stops_the_spawned_workers_once(tmp_path: Path, data_dir: Path) -> None:
    """trainer=ddp_cpu started as a terminal starts it, in a process group of its own, and Ctrl-C after step 1: the
    terminal signals the whole group. The workers, in a group of their own, get it once, from the main process (in
    the main process's group, a worker took the main process's as a second Ctrl-C and stopped at once, saving nothing:
    the other worker failed, or the main process waited forever); they stop after that step and save, the run exits
    with 130 and resumes from there."""
    ctrl_c = fault("CtrlCAt", step=1)
    result = run_failing(tmp_path, *SHARDED_RUN, "trainer=ddp_cpu", *ctrl_c, new_session=True)
    assert result.returncode == 130, result.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"stopped by SIGINT (saved {last}); to go on, run: python run.py resume={tmp_path}"
    assert "stopped at once" not in result.stdout + result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 1
    resumed = run_cli(tmp_path, f"resume={tmp_path}", "test=false")
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    assert (tmp_path / "prefix" / "prefix.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("when", "name", "status"),
    [("SignalMainAtSetup", "SIGUSR1", 138), ("SignalMainAsItLaunches", "SIGINT", 130)],
    ids=["as_the_workers_set_up", "while_the_workers_are_launched"],
)
def test_a_signal_as_the_spawned_workers_start_stops_the_run_saving_nothing(
    when: str, name: str, status: int, tmp_path: Path, data_dir: Path
) -> None:
    """trainer=ddp_cpu: a stop signal to the main process while the workers set up, before they listen for it, ends
    them; one that comes while the main process launches them, before it knows them, is kept and handed to them once
    they are ready for it (handed to no one, it let the run train on to its end; handed to a worker not yet ready,
    it ended it quietly and the main process waited forever). Either way the run exits as one stopped by it
    (128+signal, not 1 with the workers' exit), saying that nothing was saved and how to start again."""
    result = run_failing(tmp_path, *SHARDED_RUN, "trainer=ddp_cpu", *fault(when, name=name))
    assert result.returncode == status, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"stopped by {name} (no checkpoint saved); to go on, run: python run.py resume={tmp_path}"
    assert f"{name} reached the workers as they started" in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.integration
def test_two_process_fsdp_checkpoints_lora_inside_the_sharded_layers_as_ddp_does(
    tmp_path: Path, data_dir: Path
) -> None:
    """LoRA trains inside the decoder layers, FSDP units of their own (whose names FSDP's wrappers change): the
    checkpoint still holds every adapter tensor, whole, as DDP's does."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_cli(ddp, *SHARDED_RUN, "method=lora", "test=false", "trainer=ddp_cpu", "trainer.strategy=ddp")
    run_cli(fsdp, *SHARDED_RUN, "method=lora", "test=false", *SHARDED)
    assert all(".lora_" in key for key in _assert_same_checkpoint(fsdp, ddp))


def _assert_same_checkpoint(run: Path, reference: Path) -> list[str]:
    """The last checkpoints of the two runs hold the same tensors and AdamW moments; returns the tensors' names."""
    ours, theirs = (torch.load(path / "checkpoints" / "last.ckpt", weights_only=True) for path in (run, reference))
    assert ours["global_step"] == theirs["global_step"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, tensor in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][key], tensor, atol=1e-6, rtol=0)
    # Keyed by index among all parameters under FSDP, among the optimized ones under DDP: the same order.
    moments = [state for _, state in sorted(ours["optimizer_states"][0]["state"].items())]
    expected = [state for _, state in sorted(theirs["optimizer_states"][0]["state"].items())]
    assert len(moments) == len(expected) == len(theirs["state_dict"])
    for state, expected_state in zip(moments, expected, strict=True):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name], expected_state[name], atol=1e-9, rtol=1e-5)
    return list(ours["state_dict"])


def _test_bleu(run_dir: Path) -> float:
    return json.loads((run_dir / "result.json").read_text())["test"]["test/bleu"]


def test_ranks_split_each_global_batch_and_resume_mid_epoch() -> None:
    """Rank r takes the r-th share of every global batch of the single-process order, also after a resume."""
    single = list(EpochShuffleSampler(10, seed=3, batch_size=4))
    ranks = [list(EpochShuffleSampler(10, seed=3, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [5, 5]
    for begin, width in ((0, 4), (4, 4), (8, 2)):
        share = width // 2
        rank_begin = begin // 2
        together = ranks[0][rank_begin : rank_begin + share] + ranks[1][rank_begin : rank_begin + share]
        assert together == single[begin : begin + width]
    for rank in (0, 1):
        resumed = EpochShuffleSampler(10, seed=3, batch_size=2, num_replicas=2, rank=rank)
        resumed.resume_at(4)  # one global batch of 4 done
        assert list(resumed) == ranks[rank][2:]
        assert list(resumed) == ranks[rank], "only the first pass after the resume is shortened"


# 23 examples of lengths in no order; windows of 2 global batches of 4 (3 windows, the last ending in a short batch).
LENGTHS = [7, 3, 9, 1, 12, 5, 5, 8, 2, 11, 6, 4, 10, 3, 7, 1, 9, 2, 13, 6, 8, 4, 5]


def test_batches_grouped_by_length_hold_neighbours_in_length_of_their_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each global batch holds the examples of one stretch of its window's lengths (less padding); the windows' own
    examples and the order of their batches come from (seed, epoch); the short batch stays last."""
    monkeypatch.setattr(sampler_module, "LENGTH_WINDOW", 2)

    def order(seed: int = 3, epoch: int = 0) -> list[int]:
        sampler = EpochShuffleSampler(len(LENGTHS), seed=seed, batch_size=4, lengths=LENGTHS)
        sampler.set_epoch(epoch)
        return list(sampler)

    grouped = order()
    assert sorted(grouped) == list(range(len(LENGTHS)))
    plain = list(EpochShuffleSampler(len(LENGTHS), seed=3, batch_size=4))
    for begin in range(0, len(LENGTHS), 8):  # a window: the same examples as the random order's, regrouped
        window = grouped[begin : begin + 8]
        assert sorted(window) == sorted(plain[begin : begin + 8])
        ranked = sorted((LENGTHS[i] for i in window), reverse=True)
        for batch in (window[:4], window[4:]):
            lengths = sorted((LENGTHS[i] for i in batch), reverse=True)
            assert lengths in (ranked[: len(batch)], ranked[4 : 4 + len(batch)])
    assert len(grouped[-3:]) == 3 and sorted(grouped[-3:]) == sorted(sorted(plain[16:], key=LENGTHS.__getitem__)[:3])
    padding = [
        sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in (o[b : b + 4] for b in range(0, 23, 4)))
        for o in (grouped, plain)
    ]
    assert padding[0] < padding[1]
    assert order() == grouped and order(epoch=1) != grouped and order(seed=4) != grouped


def test_ranks_split_each_global_batch_grouped_by_length_and_resume_mid_epoch() -> None:
    """Ranks take their shares of the single process's global batches, grouped the same (each global batch is
    grouped as a whole), and a resume goes on in that order."""
    single = list(EpochShuffleSampler(len(LENGTHS), seed=3, batch_size=4, lengths=LENGTHS))
    ranks = [
        EpochShuffleSampler(len(LENGTHS), seed=3, batch_size=2, num_replicas=2, rank=r, lengths=LENGTHS) for r in (0, 1)
    ]
    shares = [list(rank) for rank in ranks]
    for begin in range(0, 20, 4):
        together = shares[0][begin // 2 : begin // 2 + 2] + shares[1][begin // 2 : begin // 2 + 2]
        assert together == single[begin : begin + 4]
    ranks[1].resume_at(8)  # two global batches done
    assert list(ranks[1]) == shares[1][4:]


def test_lengths_must_cover_every_example() -> None:
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        EpochShuffleSampler(4, seed=0, lengths=[1, 2, 3])


def test_every_epoch_draws_its_own_order_of_every_example_from_the_seed() -> None:
    """A resumed run sees the order of the uninterrupted run only if the order depends on (seed, epoch) alone; and
    an order repeated every epoch would train on the same batches over and over."""

    def order(epoch: int, seed: int = 3) -> list[int]:
        sampler = EpochShuffleSampler(10, seed=seed, batch_size=4)
        sampler.set_epoch(epoch)
        return list(sampler)

    orders = [order(epoch) for epoch in range(3)]
    assert all(sorted(drawn) == list(range(10)) for drawn in orders)
    assert len({tuple(drawn) for drawn in orders}) == 3
    assert orders[1] == order(1) != order(1, seed=4)


def test_ranks_of_an_uneven_set_take_equal_shares_padded_from_the_start_of_the_order() -> None:
    """A rank with one batch fewer than the others would leave them waiting for its gradients (DDP hangs)."""
    single = list(EpochShuffleSampler(9, seed=3, batch_size=4))
    ranks = [EpochShuffleSampler(9, seed=3, batch_size=2, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [list(rank) for rank in ranks]
    assert [len(share) for share in shares] == [len(rank) for rank in ranks] == [5, 5]
    assert shares[0][4:] + shares[1][4:] == [single[8], single[0]]  # the last global batch, padded as it starts
    ranks[1].resume_at(8)  # two global batches done: the rest as the whole pass had it, padding included
    assert list(ranks[1]) == shares[1][4:]


def test_a_resumed_epoch_starts_after_the_batches_trained_and_a_complete_one_starts_over() -> None:
    """What Lightning restores (batches completed in the epoch, the epoch) decides where the order goes on."""

    def resumed_order(done: int, epoch: int = 2) -> list[int]:
        loops = SimpleNamespace(
            restarting=True,
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(completed=done))),
            epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=epoch)),
        )
        trainer = SimpleNamespace(world_size=1, global_rank=0, fit_loop=loops)
        return list(training_sampler(10, seed=3, batch_size=2, trainer=trainer))

    whole = EpochShuffleSampler(10, seed=3, batch_size=2)
    whole.set_epoch(2)
    assert resumed_order(0) == resumed_order(5) == list(whole)  # 5 batches of 2: the epoch was complete
    assert resumed_order(1) == list(whole)[2:]


def test_a_spawned_worker_ends_its_process_group_before_it_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gloo group left to the interpreter's exit at times aborted a worker; each ends its own, after its results
    are handed over (also when the stage failed)."""
    # The worker's function sets LOCAL_RANK in this process; left behind, a later run.py in this session took it
    # for a launcher's and never started its rank 1.
    monkeypatch.setenv("LOCAL_RANK", "0")
    strategy = SpawnDDPStrategy(parallel_devices=[torch.device("cpu")])
    strategy._configure_launcher()
    store = f"file://{tmp_path / 'store'}"

    def stage() -> str:
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        return "results"

    handed_over: queue.Queue = queue.Queue()
    try:
        strategy.launcher._wrapping_function(0, None, stage, (), {}, handed_over)
        assert handed_over.get_nowait() == "results"
        assert not torch.distributed.is_initialized()
        with pytest.raises(RuntimeError, match="stage failed"):
            strategy.launcher._wrapping_function(0, None, lambda: stage() and _fail(), (), {}, handed_over)
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fail() -> None:
    raise RuntimeError("stage failed")


def test_a_spawned_fit_hands_its_progress_and_callbacks_states_back(tmp_path: Path) -> None:
    """The test stage of ``trainer=ddp_cpu`` runs in new processes: the fit's steps, score and export must reach
    them through the main process (Lightning brings back the logged metrics alone)."""
    strategy = SpawnDDPStrategy(parallel_devices=[torch.device("cpu")])
    strategy._configure_launcher()

    def trainer() -> L.Trainer:
        export = MethodExport(str(tmp_path / "prefix"))
        return L.Trainer(accelerator="cpu", callbacks=[export], logger=False, default_root_dir=tmp_path)

    worker, main = trainer(), trainer()
    worker.fit_loop.epoch_progress.current.completed = 2
    worker.callback_metrics["val/bleu"] = torch.tensor(12.5)
    export = next(c for c in worker.callbacks if isinstance(c, MethodExport))
    export.load_state_dict({"source": "best", "step": 6, "validation": {"val/bleu": 12.5}})
    main.state.fn = TrainerFn.FITTING
    strategy.launcher.update_main_process_results(main, strategy.launcher.get_extra_results(worker))
    assert main.fit_loop.state_dict() == worker.fit_loop.state_dict() != trainer().fit_loop.state_dict()
    handed = next(c for c in main.callbacks if isinstance(c, MethodExport))
    assert handed.state_dict() == {"source": "best", "step": 6, "validation": {"val/bleu": 12.5}}
    assert float(main.callback_metrics["val/bleu"]) == 12.5


def test_a_spawned_fits_time_is_counted_once(tmp_path: Path) -> None:
    """The record's state handed back from the fit's workers holds the attempt's time so far; a later attempt
    resuming from a checkpoint adds its own time to the earlier attempts'."""
    record = ResultRecord(str(tmp_path), monitor="val/bleu")
    record._started -= 100  # the attempt started 100 s ago
    state = record.state_dict()  # as the fit's workers hand it back (trainer=ddp_cpu)
    record.load_state_dict(state)
    assert 100 <= record.state_dict()["earlier_wall_time_s"] < 101
    resumed = ResultRecord(str(tmp_path), monitor="val/bleu")
    resumed._started -= 5
    resumed.load_state_dict(state)  # a checkpoint of the attempt before
    assert 105 <= resumed.state_dict()["earlier_wall_time_s"] < 106


class _ThreadRanks:
    """``world_size`` ranks as threads of this process: ``reduce`` meets as an all-reduce of a real process group
    does (each rank's call waits for the others' and returns the sum), without starting processes."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._meeting = threading.Barrier(world_size, timeout=30)
        self._values: list[torch.Tensor | None] = [None] * world_size

    def run(self, rank_fn: Callable[[int], None]) -> None:
        """``rank_fn(rank)`` on every rank at once; the first failure is raised."""
        failures: list[BaseException] = []

        def rank_main(rank: int) -> None:
            try:
                rank_fn(rank)
            except BaseException as failure:
                failures.append(failure)
                self._meeting.abort()  # the other ranks would wait for this one

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]

    def trainer(self, rank: int) -> Any:
        """What the result record reads of rank ``rank``'s trainer."""

        def reduce(tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
            assert reduce_op == "sum"
            self._values[rank] = tensor.clone()
            self._meeting.wait()
            total = torch.stack([value for value in self._values if value is not None]).sum(0)
            self._meeting.wait()  # every rank has read the values before the next reduce writes them
            return total

        return SimpleNamespace(
            world_size=self.world_size,
            is_global_zero=rank == 0,
            strategy=SimpleNamespace(reduce=reduce),
            global_step=0,
            callbacks=[],
            checkpoint_callbacks=[],
            callback_metrics={},
            sanity_checking=False,
            loggers=[],
        )


@pytest.mark.parametrize("resumed", [False, True], ids=["test-in-new-processes", "resumed"])
def test_train_tokens_count_every_ranks_tokens_once_after_a_resume_or_a_spawned_test(
    resumed: bool, tmp_path: Path
) -> None:
    """A checkpoint, and the state a spawned fit hands to its test's new processes, hold rank 0's result record
    alone; every rank starts from it. The record must still count each rank's tokens once: neither rank 0's count
    for rank 1's, nor a count already summed over the ranks summed again."""
    ranks = _ThreadRanks(2)
    fit = [[5, 7], [6, 9]]  # the real tokens of each rank's batches, rank by rank
    after_resume = [[3], [4]] if resumed else [[], []]
    module = L.LightningModule()

    def train(record: ResultRecord, rank: int, batches: list[list[int]]) -> None:
        trainer = ranks.trainer(rank)
        for index, tokens in enumerate(batches[rank]):
            batch = {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}
            record.on_train_batch_start(trainer, module, batch, index)
            record.on_train_batch_end(trainer, module, None, batch, index)

    fitted = [ResultRecord(str(tmp_path), monitor="val/bleu") for _ in range(2)]
    ranks.run(lambda rank: train(fitted[rank], rank, fit))
    checkpoint = fitted[0].state_dict()  # what last.ckpt holds, what a spawned fit hands back
    records = [ResultRecord(str(tmp_path), monitor="val/bleu", after_test=not resumed) for _ in range(2)]

    def go_on(rank: int) -> None:
        records[rank].load_state_dict(copy.deepcopy(checkpoint))
        train(records[rank], rank, after_resume)
        if resumed:
            records[rank].on_fit_end(ranks.trainer(rank), module)
        else:
            records[rank].on_test_end(ranks.trainer(rank), module)

    ranks.run(go_on)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["train_tokens"] == sum(map(sum, fit + after_resume))


def test_train_tokens_of_an_encoder_decoder_count_the_targets_its_decoder_reads(tmp_path: Path) -> None:
    module = MethodModule(PrefixModel(tiny_lm("bart"), length=2), tokenizer=None, output_dir=str(tmp_path))
    record, trainer = ResultRecord(str(tmp_path), monitor="val/bleu"), SimpleNamespace(world_size=1)
    record.on_fit_start(trainer, module)  # type: ignore[arg-type]
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[5, 6, -100], [7, -100, -100]]),
    }
    record.on_train_batch_start(trainer, module, batch, 0)  # type: ignore[arg-type]
    record.on_train_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]
    assert record.progress["train_tokens"] == 5 + 3  # source tokens, then target tokens


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bart"])
def test_a_pickled_model_keeps_its_prefix(name: str, tmp_path: Path) -> None:
    """ddp_spawn pickles the module into each process: the copy must still inject (and train) the same prefix."""
    model, _ = build_model(compose_train(tmp_path, [f"model={name}", "model.gradient_checkpointing=true"]))
    copy = pickle.loads(pickle.dumps(model.train()))
    ids = torch.arange(1, 7).repeat(2, 1)
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    torch.testing.assert_close(copy(**inputs).loss, model(**inputs).loss, atol=0, rtol=0)
    copy(**inputs).loss.backward()
    assert all(p.grad is not None for p in copy.trainable_parameters())
    with copy.prefix_disabled():
        assert copy(**inputs).loss != model(**inputs).loss


RELAUNCHED = ["trainer=ddp_cpu", "trainer.strategy=ddp", "data.batch_size=4"]


@pytest.mark.integration
def test_relaunching_ddp_runs_from_the_command_line(tmp_path: Path, data_dir: Path) -> None:
    """Plain ``strategy=ddp`` starts the command line again for rank 1; both ranks must train and finish, rank 1
    logging into its own file, not onto the console that it shares with rank 0."""
    run = tmp_path
    result = run_cli(run, *RUN, f"+callbacks.batch_recorder.folder={run / 'batches'}", *RELAUNCHED)
    console = result.stdout + result.stderr
    assert console.count("trainable parameters, LM of") == 1
    assert "trainable parameters, LM of" in (run / "train_ddp_process_1.log").read_text()
    assert len(_seen(run, 0)) == len(_seen(run, 1)) == 3
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and all(key.startswith("model.encoders.") for key in checkpoint["state_dict"])
    assert (run / "prefix" / "prefix.safetensors").is_file()


def test_fsdp_config_shards_every_decoder_layer_of_any_model(tmp_path: Path) -> None:
    """The strategy wraps each decoder layer of any model in its own unit, the prefix in none, and keeps the
    original parameters (frozen and trainable ones share the root unit)."""
    strategy = instantiate(compose_train(tmp_path, ["trainer=fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {GradientCheckpointingLayer}  # transformers' base of every decoder layer
    for name in ("tiny_llama", "tiny_gpt2", "tiny_bart"):
        model, _ = build_model(compose_train(tmp_path, [f"model={name}"]))
        wrapped = [m for m in model.lm.modules() if isinstance(m, tuple(policy._module_classes))]
        config = model.lm.config
        layers = (
            config.encoder_layers + config.decoder_layers if config.is_encoder_decoder else config.num_hidden_layers
        )
        assert len(wrapped) == layers
        assert not any(isinstance(m, tuple(policy._module_classes)) for m in model.encoders.modules())


@contextmanager
def _fsdp_wrapped(
    model: torch.nn.Module, rank: int = 0, world_size: int = 1, store: Path | None = None
) -> Iterator[torch.nn.Module]:
    """``model`` wrapped as conf/trainer/fsdp.yaml wraps it (each decoder layer a unit, original parameters kept),
    in a real process group (gloo, CPU) of ``world_size`` processes meeting in the file ``store``. One process:
    FSDP falls back to NO_SHARD; more: each holds its shard of every unit."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    meeting = dist.FileStore(str(store), world_size) if store is not None else dist.HashStore()
    dist.init_process_group("gloo", store=meeting, rank=rank, world_size=world_size)
    try:
        policy = ModuleWrapPolicy({GradientCheckpointingLayer})
        yield FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id="cpu")
    finally:
        dist.destroy_process_group()


def _export_under_fsdp(rank: int, world_size: int, folder: Path) -> None:
    """One rank of the export test: every rank gathers, rank 0 writes; the decoder layers stay sharded meanwhile."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16))
    matrices = [m.weight for m in model.lm.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    with _fsdp_wrapped(model, rank, world_size, folder / "store") as root, fsdp_gathered(root):
        if rank == 0:
            model.save(folder / "prefix")
            assert all(weight.dim() == (2 if world_size == 1 else 1) for weight in matrices), (
                "only the root unit (prefix, embeddings, final norm) is gathered: the decoder layers stay flat shards"
            )


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp_export_writes_the_prefix_whole_from_the_root_unit_alone(world_size: int, tmp_path: Path) -> None:
    """NO_SHARD (one process) cannot offload, FSDP renames every module inside a decoder layer, and on 2 processes
    each holds half of every unit: the export still writes the prefix whole, gathering only the root unit."""
    import torch.multiprocessing as mp

    expected = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16)).prefix_key_values()
    if world_size == 1:
        _export_under_fsdp(0, 1, tmp_path)
    else:
        mp.spawn(_export_under_fsdp, args=(world_size, tmp_path), nprocs=world_size)
    loaded = PrefixModel.from_prefix(tiny_lm("llama"), tmp_path / "prefix").prefix_key_values()
    assert loaded.keys() == expected.keys()
    for name, (keys, values) in expected.items():
        torch.testing.assert_close(loaded[name][0], keys.detach())
        torch.testing.assert_close(loaded[name][1], values.detach())


def test_fsdp_clips_gradients_by_their_norm_as_plain_clipping_does() -> None:
    """Lightning's FSDP precision refuses to clip by norm; the module clips through FSDP's root instead, with the
    same result as plain clipping of the unwrapped model. Other strategies are left to Lightning's clipping."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16))
    reference = copy.deepcopy(model)
    ids, mask = pad_batch(ROWS, left=False)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    reference(**batch).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.trainable_parameters(), 1e-3)
    assert norm > 1e-3  # so that clipping changes the gradients
    assert not clip_sharded_grad_norm(DDPStrategy(), 1e-3)
    with _fsdp_wrapped(model) as root:
        root(**batch).loss.backward()
        strategy = FSDPStrategy()
        strategy.model = root
        assert clip_sharded_grad_norm(strategy, 1e-3)
        for clipped, expected in zip(model.trainable_parameters(), reference.trainable_parameters(), strict=True):
            assert clipped.grad is not None and expected.grad is not None
            torch.testing.assert_close(clipped.grad, expected.grad, atol=1e-7, rtol=1e-4)


def test_an_lm_under_fsdp_decodes_without_a_cuda_graph() -> None:
    """FSDP gathers a unit's weights at every call, which a graph replay would skip."""
    model = PrefixModel(tiny_lm("llama"), PrefixConfig(length=3, hidden_dim=16))
    cuda = torch.device("cuda")
    assert static_steps_pay(model.lm, cuda)
    with _fsdp_wrapped(model):
        assert not static_steps_pay(model.lm, cuda)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_keep_frozen_weights_out_of_checkpoints(stage: int, tmp_path: Path) -> None:
    """DeepSpeed needs CUDA and its package: instantiate where it is installed, else the target still resolves
    and instantiating says how to install it."""
    cfg = compose_train(tmp_path, [f"trainer=deepspeed_zero{stage}"])
    assert cfg.trainer.strategy.stage == stage and cfg.trainer.strategy.exclude_frozen_parameters
    assert get_class(cfg.trainer.strategy._target_).__name__ == "DeepSpeedStrategy"
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(InstantiationException, match="pip install"):
            instantiate(cfg.trainer.strategy)
    else:
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy.zero_stage_3 == (stage == 3) and strategy.exclude_frozen_parameters


def test_slurm_config_takes_ranks_from_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under srun (faked here: task 5 of 2 nodes x 4), Lightning's SLURM environment sets the ranks."""
    slurm = {
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "prefix",
        "SLURM_NODELIST": "node[1-2]",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # The trainer makes this process rank 5 for Lightning's rank-zero-only code: the next tests' must be rank 0.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = instantiate(compose_train(tmp_path, ["trainer=slurm", "trainer.accelerator=cpu"]).trainer)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.world_size, trainer.global_rank, trainer.node_rank) == (2, 8, 5, 1)
