"""DDP with spawned processes whose fit's outcome reaches the test: Lightning spawns new workers for each stage and
brings back from the fit only the weights and the logged metrics. The steps taken, the best checkpoint's score
and what the callbacks recorded (the result record's validations and token counts, which weights were exported)
stayed in the fit's workers, so the test after it saw step 0 and a run with no validation."""

from __future__ import annotations

import io
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher


class SpawnDDPStrategy(DDPStrategy):
    """``strategy=ddp_spawn`` whose launcher also brings back the fit loop's and the callbacks' states."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _StatefulLauncher(self, start_method="spawn")


class _StatefulLauncher(_MultiProcessingLauncher):
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        """Each worker ends its process group before it exits: Lightning does so for NCCL alone, and a gloo group
        left to the interpreter's exit at times aborts the worker ("terminate called without an active
        exception": gloo's threads still hold work when Python tears down)."""
        try:
            super()._wrapping_function(*args, **kwargs)
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
        return {**super().get_extra_results(trainer), "states_bytes": buffer.getvalue()}

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        states = torch.load(io.BytesIO(extra["states_bytes"]), weights_only=False)
        if trainer.state.fn == "fit":
            trainer.fit_loop.load_state_dict(states["fit_loop"])
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if states["callbacks"].get(callback.state_key):
                callback.load_state_dict(states["callbacks"][callback.state_key])
