"""Export what a run trained from any of its checkpoints, as the run exports it (with a model card):

    python -m prefix_lightning.export outputs/train/<run>/checkpoints/step100.ckpt exported/

Checkpoints hold only the trainable tensors; the rest comes from the run's own config, which Hydra keeps next to
them: checkpoints live in ``<run>/checkpoints/``, the config in ``<run>/.hydra/`` (the one the run started with,
``started_config.yaml``; Hydra rewrites ``config.yaml`` when the same folder is run again).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from prefix_lightning.cli import report_errors
from prefix_lightning.files.checkpoints import load_checkpoint
from prefix_lightning.methods.model_card import ModelCard, write_cards
from prefix_lightning.training.build import build_model, build_module
from prefix_lightning.training.record import read_record
from prefix_lightning.training.resume import RUN_CONFIG, run_config

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint: str | Path, folder: str | Path, overwrite: bool = False) -> Path:
    """Rebuild the run's method from its config, load the checkpoint's trainable tensors into it (checked: every
    one present, of its shape) and write the method's export into ``folder``, which must be empty unless
    ``overwrite`` (a run's own export folder would otherwise silently stop matching its result.json), with the model
    card of the settings the run's config gives its own (``callbacks.export.card``; none where it gives none)."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    if folder.exists() and not folder.is_dir():  # found now, not once the model is built
        raise ValueError(f"{folder} is a file: give a folder to export into (created if missing)")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} is not empty: give a new folder to export into, or --overwrite")
    if checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is a folder (a DeepSpeed checkpoint?): export reads checkpoint files")
    state = load_checkpoint(checkpoint)
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / RUN_CONFIG).is_file():
        raise FileNotFoundError(
            f"no run config for {checkpoint}: expected {run_dir / RUN_CONFIG} (a run keeps its checkpoints in "
            f"<run>/checkpoints/ and its config in <run>/{RUN_CONFIG})"
        )
    cfg = run_config(run_dir)
    cfg.paths.output_dir = str(run_dir)  # the one setting that Hydra's runtime filled in
    model, tokenizer = build_model(cfg)
    module = build_module(cfg, model, tokenizer)
    module.on_load_checkpoint(state)  # refuses a checkpoint of another method, prefix shape or base model
    module.load_state_dict(state["state_dict"], strict=False)
    model.save(folder)
    step = int(state["global_step"])
    record = read_record(run_dir) or {}
    scores, exported = {}, None
    if record.get("exported_step") == step:  # the run exported and tested these very weights
        scores = {**record["test"], record["optimized_metric"]: record[f"{record['export']}_val"]}
        exported = record["export"]
    settings = OmegaConf.select(cfg, "callbacks.export.card")  # what the run's own card states
    if settings:
        card = ModelCard(
            **cast(dict[str, Any], OmegaConf.to_container(settings, resolve=True)),
            train_steps=record.get("train_steps"),
            exported=exported,
            exported_step=step,
            metrics={name: value for name, value in scores.items() if value is not None},
            trainable_params=sum(p.numel() for p in model.trainable_parameters()),
        )
        write_cards(card, folder, getattr(model, "tasks", None))  # multi-task: a card per task
    return folder


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m prefix_lightning.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint file of a run: <run>/checkpoints/<name>.ckpt")
    parser.add_argument("folder", type=Path, help="where to write the export (created if missing; must be empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    folder = report_errors(lambda: export_checkpoint(args.checkpoint, args.folder, args.overwrite))
    print(f"exported {args.checkpoint} to {folder}")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
