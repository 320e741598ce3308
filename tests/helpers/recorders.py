"""Callbacks that tests add to real runs (by config overrides) to see what happened inside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class BatchRecorder(L.Callback):
    """Writes the training examples each rank saw, batch by batch, to ``<folder>/rank<N>.json``, and the rank's own
    loss of each batch to ``<folder>/rank<N>_losses.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.batches: list[list[list[int]]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: dict, batch_idx: int) -> None:
        rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
        self.batches.append([[t for t, keep in zip(ids, mask, strict=True) if keep] for ids, mask in rows])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: dict, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))
        (self.folder / f"rank{trainer.global_rank}_losses.json").write_text(json.dumps(self.losses))


class FrozenWeights(L.Callback):
    """Writes ``<folder>/frozen_changed.json``: the names of the weights the method does not train that training
    changed anyway (there should be none)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.before: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = (item for item in pl_module.named_parameters() if not item[1].requires_grad)
        self.before = {name: parameter.detach().clone() for name, parameter in frozen}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = dict(pl_module.named_parameters())
        changed = [name for name, tensor in self.before.items() if not torch.equal(now[name], tensor)]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "frozen_changed.json").write_text(json.dumps({"frozen": len(self.before), "changed": changed}))
