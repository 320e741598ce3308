"""MultiTaskPrefix: one trainable prefix per task on one frozen LM, trained on batches that mix the tasks.

Every row reads its own task's prefix (a ``PrefixBank`` call), so a row's loss reaches that prefix only, and one
step updates the prefixes of the tasks in its batch. Each task's prefix is an ordinary prefix: it exports to
``<export dir>/<task>/`` and loads with ``PrefixModel.from_prefix`` or ``PrefixBank.add``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefix_lightning.prefix.bank import PrefixBank
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.encoder import PrefixEncoder, prefix_encoders, typed_encoders
from prefix_lightning.prefix.export import CONFIG_NAME, load_blocks, read_prefix
from prefix_lightning.prefix.model import write_prefix
from prefix_lightning.prefix.sites import AttentionSite, attention_sites
from prefix_lightning.prefix.wiring import site_keys


class TaskPrefix(nn.Module):
    """One task's trainable prefix on the bank's sites: the encoders a ``PrefixModel`` would train."""

    def __init__(self, config: PrefixConfig, sites: Sequence[AttentionSite], embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.keys = site_keys(sites)
        self.encoders = prefix_encoders(config, sites, embed_dim)

    @property
    def prefix_encoders(self) -> dict[str, PrefixEncoder]:
        """The trainable part by group, as ``PrefixModel.prefix_encoders``."""
        return typed_encoders(self.encoders)

    def groups(self, dropout: float = 0.0) -> dict[str, list[torch.Tensor]]:
        return {group: encoder(dropout) for group, encoder in self.encoders.items()}

    def site_blocks(self) -> list[torch.Tensor]:
        """Each site's keys/values (2, kv_heads, L, head_dim), in the graph (with dropout while training)."""
        groups = self.groups(self.config.dropout if self.training else 0.0)
        return [groups[group][index] for group, index in self.keys]


class MultiTaskPrefix(nn.Module):
    """One prefix per task name, trained together; batches say each row's task (``prefixes=[task, ...]``).

    ``MultiTaskPrefix(lm, tasks=["e2e", "webnlg"], config=PrefixConfig(length=10))``. The prefixes start random
    (the encoders' own initialization); a prefix kind other than "prefix" and initialization from words are
    single-task options (``PrefixModel``).
    """

    leaves_parameters_unused = True  # the prefixes of tasks a batch lacks get no gradient (data-parallel runs ask)

    def __init__(
        self,
        lm: PreTrainedModel,
        tasks: Sequence[str],
        config: PrefixConfig | Mapping[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.config = PrefixConfig.of(config, **fields)
        if self.config.kind != "prefix":
            raise ValueError(f"multi-task training trains prefixes (kind 'prefix'), not kind {self.config.kind!r}")
        if self.config.init_text is not None or self.config.init_vocab:
            raise ValueError(
                "multi-task prefixes start random: prefix.init_text / prefix.init_vocab are single-task options"
            )
        tasks = list(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"give one or more distinct task names, got {tasks}")
        self.tasks = tasks
        self.bank = PrefixBank(lm)
        # transformers types the embeddings as a plain Module.
        embed_dim: int = lm.get_input_embeddings().embedding_dim  # type: ignore[assignment]
        for task in tasks:
            self.bank.hold(task, TaskPrefix(self.config, self.bank.sites, embed_dim))

    @property
    def lm(self) -> PreTrainedModel:
        return self.bank.lm

    @property
    def virtual_positions(self) -> int:
        return self.bank.virtual_positions

    def forward(self, **inputs: Any) -> Any:
        """The LM's forward with each row's task prefix (``prefixes=[task, ...]``)."""
        return self.bank(**inputs)

    def loss(self, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        return self.bank.loss(labels, **inputs)

    def generate(self, **kwargs: Any) -> Any:
        return self.bank.generate(**kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """The trainable tensors of one task's prefix, by name."""
        return dict(self.task_prefix(task).named_parameters())

    def task_prefix(self, task: str) -> TaskPrefix:
        """The trainable prefix of one task (held by the bank)."""
        return cast(TaskPrefix, self.bank.entries[task])

    def enable_gradient_checkpointing(self) -> None:
        self.bank.enable_gradient_checkpointing()

    @classmethod
    def from_export(cls, lm: PreTrainedModel, path: str | Path) -> MultiTaskPrefix:
        """A multi-task export (``path/<task>/``, a prefix each) back on ``lm``, to evaluate every task or train on:
        each task's prefix as trained (no MLP). Refuses a base model of another shape."""
        exports = {folder.name: read_prefix(folder) for folder in task_folders(path)}
        if not exports:
            raise FileNotFoundError(f"no task prefixes in {path}: expected <task>/{CONFIG_NAME} folders")
        configs = {task: exported.config for task, exported in exports.items()}
        first = next(iter(configs.values()))
        if any(config != first for config in configs.values()):
            raise ValueError(f"the task prefixes in {path} differ in their settings; load them into a PrefixBank")
        sites = attention_sites(lm)  # checked before lm is wrapped: a refused export leaves it as it was
        blocks = {task: exported.fitted_blocks(lm, sites) for task, exported in exports.items()}
        model = cls(lm, list(exports), first)
        for task, task_blocks in blocks.items():
            load_blocks(model.task_prefix(task).prefix_encoders, task_blocks)
        return model

    def save(self, path: str | Path) -> Path:
        """Each task's prefix, materialized (MLP dropped), into ``path/<task>/``: an ordinary prefix export each (see
        :func:`write_prefix`)."""
        path = Path(path)
        for task in self.tasks:
            entry = self.task_prefix(task)
            with torch.no_grad():
                blocks = entry.groups()
            write_prefix(path / task, blocks, self.config, self.lm, self.bank.sites)
        return path


def task_folders(path: str | Path) -> list[Path]:
    """The task prefixes of a multi-task export (its subfolders holding a prefix), by name; none for a folder that
    is itself a prefix export."""
    path = Path(path)
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return []
    return sorted(folder for folder in path.iterdir() if (folder / CONFIG_NAME).is_file())
