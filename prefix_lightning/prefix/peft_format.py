"""PEFT's prefix-tuning adapter folder, written and read without peft: ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``prompt_embeddings``, the (L, layers * 2 * kv_heads * head_dim) table PEFT
saves (with ``prefix_projection`` too: it saves the MLP's output, never the MLP). Row t holds virtual token t's
keys and values, layer by layer, keys before values, head by head.

PEFT hands a prefix to the LM as its key/value cache: one table for all layers, so every layer must have the same
key/value heads and head size, the real tokens stand at positions L, L+1, ... (``shift_positions``), and a sliding
window would drop the prefix with the oldest tokens (ours stays visible). For encoder-decoder models PEFT's table
holds the decoder's self- and cross-attention prefixes only (no encoder prefix), so ours, which has all three, has
no exact PEFT form. :func:`peft_incompatibility` says which of these a prefix meets. The conversion goes through
``PrefixModel.prefix_key_values()`` (per attention site, in cache-layer order), never the internal tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefix_lightning.files import atomic_write
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.sites import AttentionSite

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_LEGACY_WEIGHTS = "adapter_model.bin"
TABLE = "prompt_embeddings"
PEFT_TYPE = "PREFIX_TUNING"


def peft_incompatibility(config: PrefixConfig, sites: Sequence[AttentionSite], is_encoder_decoder: bool) -> str | None:
    """Why PEFT's prefix tuning cannot compute what this prefix computes, or None when it can exactly."""
    if is_encoder_decoder:
        return (
            "PEFT's prefix for encoder-decoder models sits in the decoder's self- and cross-attention only, while "
            "this one also has a prefix in every encoder self-attention layer, which PEFT has no place for"
        )
    if config.kind != "prefix":
        return f"a prefix of kind {config.kind!r} has no PEFT counterpart (PEFT's is a prefix in every layer)"
    if not config.shift_positions:
        return "PEFT puts the real tokens at positions L, L+1, ...; this prefix was trained with shift_positions=false"
    first = sites[0]
    differing = next((s for s in sites if (s.kv_heads, s.head_dim) != (first.kv_heads, first.head_dim)), None)
    if differing is not None:
        return (
            f"PEFT's table needs one key/value shape in every layer, but {first.name} has {first.kv_heads} key/value "
            f"heads of size {first.head_dim} and {differing.name} {differing.kv_heads} of size {differing.head_dim}"
        )
    windowed = next((site for site in sites if site.sliding_window is not None), None)
    if windowed is not None:
        return (
            f"{windowed.name} attends through a sliding window of {windowed.sliding_window} tokens: PEFT's prefix, "
            "held in the cache, falls out of the window, where this one stays visible to every token"
        )
    return None


def peft_table(key_values: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """PEFT's table from each layer's (keys, values), each (kv_heads, L, head_dim), bottom layer first."""
    stacked = torch.stack([torch.stack([keys, values]) for keys, values in key_values])  # (layers, 2, kv, L, hd)
    length = stacked.shape[3]
    return stacked.permute(3, 0, 1, 2, 4).reshape(length, -1)


def layer_key_values(
    table: torch.Tensor, layers: int, kv_heads: int, head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`peft_table`: each layer's (keys, values), bottom layer first."""
    length = table.shape[0]
    blocks = table.reshape(length, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    return [(block[0], block[1]) for block in blocks]


def save_peft_prefix(
    folder: Path,
    key_values: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: PrefixConfig,
    base_model: str | None,
) -> Path:
    """Write the prefix (``key_values`` per attention module, in layer order) as PEFT's adapter folder."""
    pairs = list(key_values.values())
    kv_heads, length, head_dim = pairs[0][0].shape
    table = peft_table([(k.detach().float().cpu(), v.detach().float().cpu()) for k, v in pairs]).contiguous()
    description = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": length,
        "num_layers": len(pairs),
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": config.hidden_dim if config.reparam == "mlp" else kv_heads * head_dim,
        "prefix_projection": config.reparam == "mlp",
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / PEFT_WEIGHTS, lambda tmp: save_file({TABLE: table}, tmp, metadata={"format": "pt"}))
    atomic_write(folder / PEFT_CONFIG, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
    return folder


@dataclass(frozen=True)
class PeftPrefix:
    """A PEFT prefix-tuning adapter folder, read and checked: its settings and its table."""

    folder: Path
    length: int
    layers: int
    token_dim: int
    table: torch.Tensor
    heads: int | None = None  # the key/value heads the width splits into (``num_attention_heads``), where recorded
    base_model: str | None = None  # ``base_model_name_or_path``, where recorded

    def key_values(self, sites: Sequence[AttentionSite]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) for a model with these attention ``sites``; refuses another shape (the same
        width split into other heads included: the values would land in the wrong heads)."""
        kv_heads, head_dim = sites[0].kv_heads, sites[0].head_dim
        if self.layers != len(sites) or self.token_dim != kv_heads * head_dim or self.heads not in (None, kv_heads):
            heads = f" in {self.heads} heads" if self.heads is not None else ""
            raise ValueError(
                f"the PEFT prefix in {self.folder} is for {self.layers} layers of key/value width {self.token_dim}"
                f"{heads}, but this model has {len(sites)} layers of {kv_heads} key/value heads x {head_dim}: load it "
                "onto the base model it was trained for"
            )
        return layer_key_values(self.table, self.layers, kv_heads, head_dim)


def read_peft_config(folder: Path) -> dict[str, Any]:
    """The description in ``folder``'s ``adapter_config.json``; refused naming the file where it cannot be read."""
    config_file = folder / PEFT_CONFIG
    try:
        description = json.loads(config_file.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no PEFT adapter at {folder}: {PEFT_CONFIG} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON file ({error})") from error
    if not isinstance(description, dict):
        raise ValueError(f"{config_file} holds no JSON object")
    return description


def peft_adapter_type(folder: Path) -> str | None:
    """The ``peft_type`` of the PEFT adapter in ``folder`` (``PREFIX_TUNING``, ``LORA``, ...); None where it holds none
    that can be read."""
    try:
        found = read_peft_config(folder).get("peft_type")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, str) else None


def read_peft_prefix(folder: str | Path) -> PeftPrefix:
    """The PEFT prefix-tuning adapter in ``folder``; anything else is refused naming the file and the problem."""
    folder = Path(folder)
    config_file = folder / PEFT_CONFIG
    description = read_peft_config(folder)
    found = description.get("peft_type")
    if found != PEFT_TYPE:
        raise ValueError(f"{config_file} describes a {found!r} adapter, not PEFT's prefix tuning ({PEFT_TYPE})")
    missing = [key for key in ("num_virtual_tokens", "num_layers", "token_dim") if description.get(key) is None]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)} (written before PEFT loaded it onto a model?)")
    table = _read_table(folder)
    try:
        length, layers, token_dim = (int(description[key]) for key in ("num_virtual_tokens", "num_layers", "token_dim"))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{config_file}: num_virtual_tokens, num_layers and token_dim must be integers ({error})"
        ) from error
    if tuple(table.shape) != (length, layers * 2 * token_dim):
        raise ValueError(
            f"{folder} holds a {TABLE} table of shape {tuple(table.shape)}, but {PEFT_CONFIG} describes "
            f"({length}, {layers} layers x 2 x {token_dim})"
        )
    task = description.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ValueError(f"{config_file} is a {task} adapter; PEFT prefixes load onto decoder-only LMs (CAUSAL_LM)")
    heads = description.get("num_attention_heads")
    base_model = description.get("base_model_name_or_path") or None
    return PeftPrefix(
        folder, length, layers, token_dim, table.float(), int(heads) if heads is not None else None, base_model
    )


def _read_table(folder: Path) -> torch.Tensor:
    weights, legacy = folder / PEFT_WEIGHTS, folder / PEFT_LEGACY_WEIGHTS
    path = weights if weights.is_file() or not legacy.is_file() else legacy
    try:
        tensors = load_file(path) if path == weights else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no PEFT adapter weights in {folder}: {PEFT_WEIGHTS} is missing") from error
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"cannot read {path}: {error} (truncated or corrupted file?)") from error
    if not isinstance(tensors, dict) or TABLE not in tensors:
        raise ValueError(f"{path} holds no {TABLE} tensor: not a PEFT prefix-tuning adapter")
    return tensors[TABLE]
