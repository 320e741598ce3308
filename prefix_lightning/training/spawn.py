"""DDP with spawned processes whose fit's outcome reaches the test: Lightning spawns new workers for each stage and
brings back from the fit only the weights and the logged metrics. The steps taken, the best checkpoint's score
and what the callbacks recorded (the result record's validations and token counts, which weights were exported)
stayed in the fit's workers, so the test after it saw step 0 and a run with no validation.

A stop signal (SIGTERM, SIGUSR1, Ctrl-C) stops it as it stops one process (see ``LastCheckpoint``): the main
process, which only waits for its workers, hands the signal to them (one that comes while it launches them, once
they are ready for it); they stop and save, and their stop is handed back to it with their results; one that reaches
them as they start, before they listen for it, ends them, and the run stops the same way, having saved nothing.
Lightning's spawning main process neither hands signals over nor learns that the workers stopped: a signal killed it
at once, leaving nothing saved.

A spawned worker starts with no logging set up (Hydra sets it up in the main process): what the stages log (the
export, the test, the result record) reached neither run.log nor the console. The workers log as the relaunched
ranks of ``strategy=ddp`` do: rank 0 where the main process does, the others into ``train_ddp_process_<rank>.log``
next to it, keeping to errors on the console."""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing import ProcessExitedException

from prefix_lightning.training.callback_lookup import find_callback
from prefix_lightning.training.last_checkpoint import LastCheckpoint, WorkersStopped

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class SpawnDDPStrategy(DDPStrategy):
    """``strategy=ddp_spawn`` whose launcher also brings back the fit loop's and the callbacks' states, and stops
    on a signal as one process does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _StatefulLauncher(self, start_method="spawn")


class _StatefulLauncher(_MultiProcessingLauncher):
    """Lightning's spawning launcher that also brings back the workers' states and their stop, and whose workers
    log as the main process does (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logging: _MainProcessLogging | None = None  # read by launch, in the main process

    def launch(self, function: Callable[..., Any], *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        """A stop signal that reaches the workers as they start, before they listen for it, ends them (the
        signal's default action): the run stops as one stopped by it, not as one that failed (exit status 1)."""
        self.handed_over: str | None = None  # the stop signal handed to the workers
        self._logging = _MainProcessLogging.read()
        # Each worker's pid, as it is ready. Not a multiprocessing queue, whose lock a worker ended by the signal
        # handed over could keep: a pipe's short messages are written whole.
        ready, self._ready = mp.get_context(self._start_method).Pipe(duplex=False)
        with self._stop_signals_handed_to_workers(ready):
            try:
                return super().launch(function, *args, trainer=trainer, **kwargs)
            except ProcessExitedException as ended:
                if self.handed_over is None:
                    raise
                log.warning("%s reached the workers as they started: they ended, saving nothing", self.handed_over)
                raise WorkersStopped(self.handed_over) from ended

    @contextmanager
    def _stop_signals_handed_to_workers(self, ready: Connection) -> Iterator[None]:
        """While the workers run, a stop signal to the main process is theirs: it is handed to each of them once
        (they stop after the current step) by :meth:`_hand_over_when_ready`. A second Ctrl-C stops at once, as it
        does one process: the workers are killed and the main process raises ``KeyboardInterrupt``."""
        if threading.current_thread() is not threading.main_thread():  # signals are handled by the main thread
            yield
            return
        signals: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # its put may be called in a signal handler

        def hand_over(signum: int, frame: Any) -> None:
            self.handed_over = self.handed_over or signal.Signals(signum).name
            signals.put(signum)
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, stop_at_once)

        def stop_at_once(signum: int, frame: Any) -> None:
            self.kill(signal.SIGKILL)
            raise KeyboardInterrupt

        found = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, hand_over)
        handing_over = threading.Thread(target=self._hand_over_when_ready, args=(ready, signals), daemon=True)
        handing_over.start()
        try:
            yield
        finally:
            for signum, handler in found.items():
                if handler is not None:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(signum, handler)
            self._ready.send(None)
            signals.put(None)
            handing_over.join()

    def _hand_over_when_ready(self, ready: Connection, signals: queue.SimpleQueue[int | None]) -> None:
        """Hands the stop ``signals`` to the workers once all are ``ready`` for them (see
        ``_stage_stopped_as_one_process``), those that came before then included, until ``None``; in a thread of the
        main process. The main process knows its workers only once it has started them all (a signal that came
        before was handed to no one, and the run trained on), and a worker that had not yet taken its signals ended
        quietly on SIGINT, handing nothing back (the main process waited forever)."""
        workers: list[int] = []
        while len(workers) < self._strategy.num_processes:  # type: ignore[attr-defined]  # a DDPStrategy's
            pid = ready.recv()
            if pid is None:  # the launch is over
                return
            workers.append(pid)
        while (signum := signals.get()) is not None:
            for pid in workers:
                with suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, signum)

    def _wrapping_function(
        self, process_idx: int, trainer: L.Trainer | None, function: Callable[..., Any], *args: Any
    ) -> None:
        """Each worker ends its torch.distributed process group before it exits: Lightning does so for NCCL alone,
        and a gloo group left to the interpreter's exit at times aborts the worker ("terminate called without an
        active exception": gloo's threads still hold work when Python tears down)."""
        if self._logging is not None:
            self._logging.set_up(process_idx)
        try:
            stage = (
                function if trainer is None else partial(_stage_stopped_as_one_process, trainer, self._ready, function)
            )
            super()._wrapping_function(process_idx, trainer, stage, *args)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        states = {
            "fit_loop": trainer.fit_loop.state_dict(),
            # Lightning sets this attribute without declaring it.
            "callbacks": {c.state_key: c.state_dict() for c in trainer.callbacks},  # type: ignore[attr-defined]
        }
        buffer = io.BytesIO()
        torch.save(states, buffer)  # as Lightning sends its metrics: bytes, not tensors in shared memory
        last = find_callback(trainer.callbacks, LastCheckpoint)  # type: ignore[attr-defined]
        stopped_by = last.stopped_by if last is not None else None
        return {**super().get_extra_results(trainer), "states_bytes": buffer.getvalue(), "stopped_by": stopped_by}

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        """After the workers' states, their stop: the main process stops as they did, and after a fit that a
        signal reached after its last step, before the test (which one process would stop as it starts)."""
        super().update_main_process_results(trainer, extra)
        states = torch.load(io.BytesIO(extra["states_bytes"]), weights_only=False)
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.fit_loop.load_state_dict(states["fit_loop"])
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if states["callbacks"].get(callback.state_key):
                callback.load_state_dict(states["callbacks"][callback.state_key])
        stopped_by = extra["stopped_by"]
        if trainer.state.status == TrainerStatus.INTERRUPTED or (stopped_by and trainer.state.fn == TrainerFn.FITTING):
            raise WorkersStopped(stopped_by or "SIGTERM")


def _stage_stopped_as_one_process(
    trainer: L.Trainer, ready: Connection, stage: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A worker's stage, stopped by a signal as one process's is: Lightning handles a stop (calling the callbacks'
    ``on_exception``, where ``LastCheckpoint`` saves) in the main process alone, which does not train here; the
    worker does it, then hands its results back as after a finished stage, marked interrupted.

    The worker first takes its signals, then tells the main process, through ``ready``, that they may be handed to
    it. It leaves the main process's process group (the operating system's), so that a stop signal reaches it once,
    from the main process (Ctrl-C at a terminal signals the whole group: handed over as well, it came twice, the
    second stopping at once). Until the stage listens for SIGINT, SIGINT ends the worker as SIGTERM does: Python's
    ``KeyboardInterrupt`` ends a spawned worker quietly, handing nothing back, and the main process waited
    forever."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ready.send(os.getpid())
    try:
        return stage(*args, **kwargs)
    except SIGTERMException as stop:
        _interrupt(trainer, stop)
        trainer._teardown()
        trainer.state.stage = None  # as Lightning does after its teardown
        return None


@dataclass(frozen=True)
class _LogHandler:
    file: str | None  # a file's path, else the console
    stream: str  # the console's: "stdout" or "stderr"
    level: int
    formatter: logging.Formatter | None


@dataclass(frozen=True)
class _MainProcessLogging:
    """The main process's logging (the root logger's level, its files and console), for the workers to set up (see
    the module)."""

    level: int
    handlers: tuple[_LogHandler, ...]

    @classmethod
    def read(cls) -> _MainProcessLogging:
        root = logging.getLogger()
        handlers = []
        for handler in root.handlers:
            if isinstance(handler, logging.FileHandler):
                handlers.append(_LogHandler(handler.baseFilename, "", handler.level, handler.formatter))
            elif type(handler) is logging.StreamHandler:
                stream = "stderr" if handler.stream is sys.stderr else "stdout"
                handlers.append(_LogHandler(None, stream, handler.level, handler.formatter))
        return cls(root.level, tuple(handlers))

    def set_up(self, rank: int) -> None:
        """In the worker of local ``rank``."""
        root = logging.getLogger()
        root.setLevel(self.level)
        for kept in self.handlers:
            handler: logging.Handler
            if kept.file is None:
                handler = logging.StreamHandler(getattr(sys, kept.stream))
                handler.setLevel(kept.level if rank == 0 else max(kept.level, logging.ERROR))
            else:
                own = Path(kept.file).with_name(f"train_ddp_process_{rank}.log")
                handler = logging.FileHandler(kept.file if rank == 0 else own)
                handler.setLevel(kept.level)
            handler.setFormatter(kept.formatter)
            root.addHandler(handler)
