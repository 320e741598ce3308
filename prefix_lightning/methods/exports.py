"""Loading any method's export folder onto its base model: the folder says what it is, and the method's own class
loads it (``PrefixModel.from_prefix``, or the baselines' ``from_export``).

Not imported by ``prefix_lightning.methods`` itself: the method classes import that package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel

from prefix_lightning.baselines import FullFineTuning, LoRA, PeftPrefixTuning, TopLayers
from prefix_lightning.baselines.top_layers import TOP_LAYERS_CONFIG
from prefix_lightning.methods.protocol import TrainableLM
from prefix_lightning.prefix import PrefixModel
from prefix_lightning.prefix.export import CONFIG_NAME
from prefix_lightning.prefix.multitask import MultiTaskPrefix, task_folders
from prefix_lightning.prefix.peft_format import PEFT_CONFIG, read_peft_config

Loader = Callable[[PreTrainedModel, str | Path], TrainableLM]
# PEFT adapter types, as adapter_config.json names them, and the loader of the class that trains each.
PEFT_METHODS: dict[str, Loader] = {"LORA": LoRA.from_export, "PREFIX_TUNING": PeftPrefixTuning.from_export}
# The file that marks each kind of export, in the order they are looked for: a prefix export also carries PEFT's
# files (PEFT can load it too), so it is recognized by its own description first.
MARKERS = {
    CONFIG_NAME: "prefix (prefix, prefix_direct, embedding, infix)",
    TOP_LAYERS_CONFIG: "top layers (top2)",
    PEFT_CONFIG: "PEFT adapter (lora, peft_prefix)",
    "config.json": "full fine-tuning (full)",
    f"<task>/{CONFIG_NAME}": "one prefix per task (multitask_prefix)",
}


def export_loader(folder: str | Path) -> Loader:
    """The method class's loader for the export in ``folder``; anything else is refused naming what it looked for."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(
            f"{folder} is a file, not an export folder (python -m prefix_lightning.export <checkpoint> <folder> "
            "exports a run's checkpoint)"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"no export folder at {folder}")
    if (folder / CONFIG_NAME).is_file():
        return PrefixModel.from_prefix
    if (folder / TOP_LAYERS_CONFIG).is_file():
        return TopLayers.from_export
    if (folder / PEFT_CONFIG).is_file():
        return PEFT_METHODS[_peft_type(folder)]
    if (folder / "config.json").is_file():
        return FullFineTuning.from_export
    if task_folders(folder):
        return MultiTaskPrefix.from_export
    expected = "; ".join(f"{marker} for {kind}" for marker, kind in MARKERS.items())
    raise FileNotFoundError(
        f"{folder} holds no export of this project's methods: expected {expected} (a method of one's own saves its "
        "own files, which its own code loads)"
    )


def load_export(lm: PreTrainedModel, folder: str | Path) -> TrainableLM:
    """Any method's export in ``folder`` on its base model ``lm``, ready to ``generate`` (or train further)."""
    return export_loader(folder)(lm, folder)


def _peft_type(folder: Path) -> str:
    found = read_peft_config(folder).get("peft_type")
    if found not in PEFT_METHODS:
        raise ValueError(
            f"{folder / PEFT_CONFIG} describes a {found!r} adapter; this project trains {', '.join(PEFT_METHODS)}"
        )
    return found
