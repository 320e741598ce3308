"""The exported prefix: materialized per-layer keys/values (MLP dropped) plus a JSON description.

Folder layout (format ``prefix-lightning/2``):
- ``prefix.safetensors``: one float32 tensor per attention site, named ``<group>.<index>`` (group "self", or
  "encoder"/"decoder"/"cross"; index in call order), shaped (2 [key, value], kv_heads, L, head_dim), the layout of
  transformers' cache layers without batch; each site has its own shape. Embedding-only holds ``input.0``, the
  (L, d_model) input embeddings.
- ``prefix_config.json``: the prefix config, the base model's identity and every site's name and shape.

Format ``prefix-lightning/1`` (one tensor per group, stacked (layers, 2, kv_heads, L, head_dim), every site of a
group of one shape) is still read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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
from prefix_lightning.prefix.encoder import PrefixEncoder, prefix_encoders, typed_encoders
from prefix_lightning.prefix.peft_format import PEFT_TYPE, peft_adapter_type
from prefix_lightning.prefix.sites import AttentionSite

log = logging.getLogger(__name__)

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "prefix-lightning/2"
STACKED_FORMAT = "prefix-lightning/1"  # older exports: one stacked tensor per group


def site_shapes(sites: Sequence[AttentionSite]) -> list[dict[str, Any]]:
    """Every attention site in call order: its module's name, group, key/value heads and head size."""
    return [
        {"name": site.name, "group": site.group, "kv_heads": site.kv_heads, "head_dim": site.head_dim} for site in sites
    ]


def _stacked_site_shapes(groups: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """The per-site description of a format-1 export (per group: layers, kv_heads, head_dim; no names)."""
    return [
        {"name": None, "group": group, "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"]}
        for group, shape in groups.items()
        for _ in range(shape["layers"])
    ]


def save_prefix(
    folder: Path,
    blocks: dict[str, list[torch.Tensor]],
    config: PrefixConfig,
    lm: PreTrainedModel,
    sites: Sequence[AttentionSite],
) -> Path:
    """Write the materialized ``blocks`` (per group, one per site) and their description atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{group}.{index}": block.detach().float().contiguous().cpu()
        for group, group_blocks in blocks.items()
        for index, block in enumerate(group_blocks)
    }
    description = {
        "format": FORMAT,
        "prefix": config.without_initialization().to_dict(),
        "base_model": backbone_identity(lm),
        "sites": site_shapes(sites),
    }
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
    return folder


def _by_group(sites: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each group's sites in call order (format 1 knows the order within a group only)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for site in sites:
        groups.setdefault(site["group"], []).append(site)
    return groups


def _shapes(groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[int, int]]]:
    return {group: [(site["kv_heads"], site["head_dim"]) for site in sites] for group, sites in groups.items()}


def _counts(groups: dict[str, list[dict[str, Any]]]) -> str:
    return ", ".join(f"{len(sites)} {group}" for group, sites in groups.items())


@dataclass(frozen=True)
class ExportedPrefix:
    """A prefix folder as written by :func:`save_prefix` (or by format 1), read and checked."""

    folder: Path
    format: str
    config: PrefixConfig
    base_model: dict[str, Any]
    sites: list[dict[str, Any]]

    def check_fits(self, lm: PreTrainedModel, sites: Sequence[AttentionSite]) -> None:
        """Refuse a base model whose attention sites differ, site by site, from those the prefix was trained for,
        or of another model type (the same shapes hold other computations); warn where only the name differs."""
        trained, found = _by_group(self.sites), _by_group(site_shapes(sites))
        expected, given = _shapes(trained), _shapes(found)
        name, model_type = self.base_model.get("name_or_path"), self.base_model.get("model_type")
        trained_for = f"{name or 'a model'}{f' ({model_type})' if model_type else ''}"
        if expected == given:
            if model_type is not None and model_type != lm.config.model_type:
                raise ValueError(
                    f"the prefix in {self.folder} was trained for {trained_for}; this base model is a "
                    f"{lm.config.model_type} model of the same shape: load it onto the base model it was trained for"
                )
            if name and lm.name_or_path and name != lm.name_or_path:
                log.warning(
                    "the prefix in %s was trained on %s; this base model is %s", self.folder, name, lm.name_or_path
                )
            return
        if {group: len(shapes) for group, shapes in expected.items()} != {g: len(s) for g, s in given.items()}:
            difference = f"attention sites {_counts(trained)}, where this base model has {_counts(found)}"
        else:
            group, index = next(
                (group, i)
                for group, shapes in expected.items()
                for i, shape in enumerate(shapes)
                if shape != given[group][i]
            )
            site, here = trained[group][index], found[group][index]
            difference = (
                f"its {group} site {index} with {site['kv_heads']} key/value heads of size {site['head_dim']}, "
                f"where this base model's ({here['name']}) has {here['kv_heads']} of size {here['head_dim']}"
            )
        raise ValueError(
            f"the prefix in {self.folder} was trained for {trained_for} with {difference}; this "
            f"base model ({lm.config.model_type}) does not fit it: load it onto the base model it was trained for"
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors by name, ``<group>.<index>`` (a format-1 file's stacked groups split per site)."""
        path = self.folder / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"the exported prefix in {self.folder} has no {WEIGHTS_NAME}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {path}: {error} (truncated or corrupted file?)") from error
        if self.format == FORMAT:
            return tensors
        stacked = {site["group"] for site in self.sites}  # the site groups stack their sites; "input" is one block
        return {
            f"{group}.{index}": block
            for group, tensor in tensors.items()
            for index, block in enumerate(tensor.unbind(0) if group in stacked else [tensor])
        }

    def fitted_blocks(self, lm: PreTrainedModel, sites: Sequence[AttentionSite]) -> dict[str, list[torch.Tensor]]:
        """The saved blocks per group, each checked to fit ``lm``'s attention ``sites``; refuses a base model of
        another shape."""
        self.check_fits(lm, sites)
        # transformers types the embeddings as a plain Module.
        embed_dim: int = lm.get_input_embeddings().embedding_dim  # type: ignore[assignment]
        encoders = typed_encoders(prefix_encoders(self.config, sites, embed_dim))
        return self.blocks({group: encoder.block_shapes() for group, encoder in encoders.items()})

    def blocks(self, shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, list[torch.Tensor]]:
        """The saved blocks per group, one per site, each checked against the ``shapes`` the loading model
        expects."""
        tensors = self.tensors()
        blocks: dict[str, list[torch.Tensor]] = {}
        for group, group_shapes in shapes.items():
            for index, shape in enumerate(group_shapes):
                block = tensors.get(f"{group}.{index}")
                if block is None or tuple(block.shape) != tuple(shape):
                    found = "none" if block is None else tuple(block.shape)
                    raise ValueError(
                        f"{self.folder / WEIGHTS_NAME}: the {group} prefix of site {index} should be "
                        f"{tuple(shape)}, got {found}"
                    )
                blocks.setdefault(group, []).append(block)
        return blocks


def load_blocks(encoders: Mapping[str, PrefixEncoder], blocks: Mapping[str, list[torch.Tensor]]) -> None:
    """Set the direct ``encoders`` of a model to the saved ``blocks`` (:meth:`ExportedPrefix.fitted_blocks`)."""
    for group, encoder in encoders.items():
        encoder.assign([block.to(encoder.prefix.device) for block in blocks[group]])


def read_prefix(folder: str | Path) -> ExportedPrefix:
    """The description of the prefix exported in ``folder``; a missing or foreign folder is named."""
    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        adapter = peft_adapter_type(folder)
        peft = {None: "", PEFT_TYPE: " (it holds a PEFT prefix adapter: PrefixModel.from_peft loads that)"}.get(
            adapter, f" (it holds a PEFT {adapter} adapter, not a prefix)"
        )
        inside = sorted(found.parent for found in folder.glob(f"*/{CONFIG_NAME}"))
        within = f" (the folders inside it that hold one: {', '.join(map(str, inside))})" if inside else ""
        raise FileNotFoundError(f"no exported prefix at {folder}: {CONFIG_NAME} is missing{peft or within}")
    try:
        description = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from error
    found = description.get("format") if isinstance(description, dict) else None
    if found not in (FORMAT, STACKED_FORMAT):
        raise ValueError(f"{config_file} is not a prefix-lightning export (format {found!r})")
    sites_type = list if found == FORMAT else dict
    expected = {"prefix": dict, "base_model": dict, "sites": sites_type}
    missing = [key for key, kind in expected.items() if not isinstance(description.get(key), kind)]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}: not a complete prefix-lightning export")
    try:
        config = PrefixConfig.of(description["prefix"], reparam="none").without_initialization()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: its prefix settings are not valid ({error})") from error
    keys = ("group", "kv_heads", "head_dim")
    try:
        sites = description["sites"] if found == FORMAT else _stacked_site_shapes(description["sites"])
        if not all(all(key in site for key in keys) for site in sites):
            raise KeyError(keys)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{config_file}: its sites should each give {', '.join(keys)} ({error!r})") from error
    return ExportedPrefix(folder, found, config, description["base_model"], sites)
