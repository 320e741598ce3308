"""The exported prefix: materialized per-layer keys/values (MLP dropped) plus a JSON description.

Folder layout:
- ``prefix.safetensors``: one float32 tensor per site group ("self", or "encoder"/"decoder"/"cross"),
  shaped (layers, 2 [key, value], kv_heads, L, head_dim), the layout of transformers' caches without batch.
- ``prefix_config.json``: the prefix config, the base model's identity and the expected shapes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from prefix_lightning.atomic import atomic_write
from prefix_lightning.backbones import backbone_identity
from prefix_lightning.config import PrefixConfig

if TYPE_CHECKING:
    from prefix_lightning.model import PrefixModel

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "prefix-lightning/1"


def site_shapes(model: PrefixModel) -> dict[str, dict[str, int]]:
    counts = Counter(site.group for site in model.sites)
    shapes = {}
    for site in model.sites:
        shape = {"layers": counts[site.group], "kv_heads": site.kv_heads, "head_dim": site.head_dim}
        shapes.setdefault(site.group, shape)
    return shapes


def save_prefix(model: PrefixModel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {group: enc().float().contiguous().cpu() for group, enc in model.encoders.items()}
    description = {
        "format": FORMAT,
        "prefix": model.config.to_dict(),
        "base_model": backbone_identity(model.lm),
        "sites": site_shapes(model),
    }
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
    return folder


def read_description(folder: Path) -> dict[str, Any]:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no exported prefix at {folder}: {CONFIG_NAME} is missing")
    try:
        description = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from error
    if description.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a prefix-lightning export (format {description.get('format')!r})")
    return description


def load_prefix(cls: type[PrefixModel], lm: PreTrainedModel, folder: Path) -> PrefixModel:
    description = read_description(folder)
    config = PrefixConfig(**{**description["prefix"], "reparam": "none"})
    model = cls(lm, config)
    expected, found = description["sites"], site_shapes(model)
    if expected != found:
        raise ValueError(
            f"the prefix in {folder} was trained for {description['base_model']['name_or_path'] or 'a model'} "
            f"({description['base_model']['model_type']}) with attention sites {expected}, but this base model "
            f"({backbone_identity(lm)['model_type']}) has {found}; load it onto the base model it was trained for"
        )
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {folder / WEIGHTS_NAME}: {error} (truncated or corrupted file?)") from error
    for group, encoder in model.encoders.items():
        if group not in tensors or tuple(tensors[group].shape) != encoder().shape:
            raise ValueError(f"{folder / WEIGHTS_NAME} has no {group} prefix of the expected shape")
        encoder.assign(tensors[group].to(encoder.prefix.device))
    return model
