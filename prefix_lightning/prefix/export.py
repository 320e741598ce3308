"""The exported prefix: materialized per-layer keys/values (MLP dropped) plus a JSON description.

Folder layout:
- ``prefix.safetensors``: one float32 tensor per site group ("self", or "encoder"/"decoder"/"cross"; "input" for
  embedding-only), shaped (layers, 2 [key, value], kv_heads, L, head_dim), the layout of transformers' caches
  without batch.
- ``prefix_config.json``: the prefix config, the base model's identity and the expected shapes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from prefix_lightning.backbones import backbone_identity
from prefix_lightning.files import atomic_write
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.sites import AttentionSite

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "prefix-lightning/1"


def site_shapes(sites: Sequence[AttentionSite]) -> dict[str, dict[str, int]]:
    """Per site group: how many layers, and their key/value heads and head size."""
    counts = Counter(site.group for site in sites)
    shapes: dict[str, dict[str, int]] = {}
    for site in sites:
        shape = {"layers": counts[site.group], "kv_heads": site.kv_heads, "head_dim": site.head_dim}
        shapes.setdefault(site.group, shape)
    return shapes


def save_prefix(
    folder: Path,
    blocks: dict[str, torch.Tensor],
    config: PrefixConfig,
    lm: PreTrainedModel,
    sites: Sequence[AttentionSite],
) -> Path:
    """Write the materialized ``blocks`` and their description atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {group: block.detach().float().contiguous().cpu() for group, block in blocks.items()}
    description = {
        "format": FORMAT,
        "prefix": config.without_initialization().to_dict(),
        "base_model": backbone_identity(lm),
        "sites": site_shapes(sites),
    }
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
    return folder


@dataclass(frozen=True)
class ExportedPrefix:
    """A prefix folder as written by :func:`save_prefix`, read and checked."""

    folder: Path
    config: PrefixConfig
    base_model: dict[str, Any]
    sites: dict[str, dict[str, int]]

    def check_fits(self, lm: PreTrainedModel, sites: Sequence[AttentionSite]) -> None:
        """Refuse a base model whose attention sites differ from those the prefix was trained for."""
        found = site_shapes(sites)
        if self.sites != found:
            raise ValueError(
                f"the prefix in {self.folder} was trained for {self.base_model['name_or_path'] or 'a model'} "
                f"({self.base_model['model_type']}) with attention sites {self.sites}, but this base model "
                f"({backbone_identity(lm)['model_type']}) has {found}; load it onto the base model it was trained for"
            )

    def tensors(self, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The saved blocks, each checked against the ``shapes`` the loading model expects."""
        path = self.folder / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"the exported prefix in {self.folder} has no {WEIGHTS_NAME}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {path}: {error} (truncated or corrupted file?)") from error
        for group, shape in shapes.items():
            if group not in tensors or tensors[group].shape != shape:
                raise ValueError(f"{path} has no {group} prefix of the expected shape")
        return tensors


def read_prefix(folder: str | Path) -> ExportedPrefix:
    """The description of the prefix exported in ``folder``; a missing or foreign folder is named."""
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no exported prefix at {folder}: {CONFIG_NAME} is missing")
    try:
        description = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else None
        raise ValueError(f"{config_file} is not a prefix-lightning export (format {found!r})")
    missing = [key for key in ("prefix", "base_model", "sites") if not isinstance(description.get(key), dict)]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}: not a complete prefix-lightning export")
    try:
        config = PrefixConfig.of(description["prefix"], reparam="none").without_initialization()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: its prefix settings are not valid ({error})") from error
    return ExportedPrefix(folder, config, description["base_model"], description["sites"])
