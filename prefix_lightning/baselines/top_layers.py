"""Fine-tuning the top transformer blocks only (the paper's FT-top2 baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_lightning.backbones import backbone_identity
from prefix_lightning.backbones.quantization import refuse_quantized
from prefix_lightning.baselines.base import FineTunedLM
from prefix_lightning.files import atomic_write
from prefix_lightning.numbers import is_int

TOP_LAYERS_WEIGHTS = "top_layers.safetensors"
TOP_LAYERS_CONFIG = "top_layers.json"
TOP_LAYERS_FORMAT = "prefix-lightning/top-layers/1"
BLOCK_LIST_NAMES = ("layers", "h", "block", "blocks")  # where models without GradientCheckpointingLayer keep them


class TopLayers(FineTunedLM):
    """The top ``layers`` blocks of the LM train (those that produce the output: an encoder-decoder's decoder)."""

    trains_lm_weights = True  # refused on a quantized LM (before it loads: training/checks.py)

    def __init__(self, lm: PreTrainedModel, layers: int = 2) -> None:
        refuse_quantized(lm, "top-layers fine-tuning")
        lm.requires_grad_(False)
        name, blocks = decoder_blocks(lm)
        if not is_int(layers) or not 1 <= layers <= len(blocks):
            raise ValueError(f"top_layers: layers must be between 1 and {len(blocks)} ({name}), got {layers!r}")
        self.layers = layers
        for block in blocks[-layers:]:
            block.requires_grad_(True)
        super().__init__(lm)

    def save(self, path: str | Path) -> Path:
        """The top blocks' tensors and a description (see :func:`load_top_layers`)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.lm.named_parameters() if p.requires_grad}
        description = {
            "format": TOP_LAYERS_FORMAT,
            "method": "top_layers",
            "layers": self.layers,
            "base_model": backbone_identity(self.lm),
        }
        metadata = {"format": TOP_LAYERS_FORMAT}
        atomic_write(folder / TOP_LAYERS_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write(folder / TOP_LAYERS_CONFIG, lambda tmp: tmp.write_text(json.dumps(description, indent=2)))
        return folder

    @classmethod
    def from_export(cls, lm: PreTrainedModel, path: str | Path) -> TopLayers:
        """``lm`` with the top blocks saved by :meth:`save`."""
        load_top_layers(lm, path)
        description = json.loads((Path(path) / TOP_LAYERS_CONFIG).read_text())
        return cls(lm, layers=description["layers"])


def decoder_blocks(lm: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The name and list of the transformer blocks that produce the LM's output (an encoder-decoder's decoder
    blocks), bottom to top: the blocks are GradientCheckpointingLayers in transformers 5, else found by name."""
    root = lm.get_decoder() if lm.config.is_encoder_decoder else lm
    inside = {id(module) for module in root.modules()}
    lists = {n: m for n, m in lm.named_modules() if id(m) in inside and isinstance(m, nn.ModuleList) and len(m)}
    found = [n for n, m in lists.items() if all(isinstance(b, GradientCheckpointingLayer) for b in m)]
    found = found or [n for n in lists if n.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the transformer blocks of {type(lm).__name__}: candidate lists {found or 'none'}"
        )
    return found[0], lists[found[0]]


def load_top_layers(lm: PreTrainedModel, path: str | Path) -> PreTrainedModel:
    """Put the top blocks saved by ``TopLayers.save`` into ``lm``; refuses tensors that do not fit it, since
    loading them partially would silently mix two models."""
    folder = Path(path)
    try:
        description = json.loads((folder / TOP_LAYERS_CONFIG).read_text())
        tensors = load_file(folder / TOP_LAYERS_WEIGHTS)
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise ValueError(f"no readable top-layers export in {folder}: {error}") from error
    if description.get("format") != TOP_LAYERS_FORMAT:
        raise ValueError(f"{folder / TOP_LAYERS_CONFIG} is not a top-layers export ({description.get('format')!r})")
    own = dict(lm.named_parameters())
    misfits = sorted(n for n, t in tensors.items() if n not in own or own[n].shape != t.shape)
    if misfits:
        raise ValueError(
            f"the layers in {folder} were trained for {description['base_model']}, but this base model "
            f"({backbone_identity(lm)['model_type']}) has no parameters of their names and shapes: {misfits[:3]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return lm
