"""Load the frozen backbone LM and its tokenizer: one return type (model in eval mode, tokenizer with a pad token)
whatever the source (see ``BackboneConfig``).

The loader does not freeze parameters: prefix tuning freezes them in its wrapper, while baselines (full
fine-tuning) train them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2Tokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefix_lightning.backbones.config import BackboneConfig
from prefix_lightning.backbones.embedded import embedded_folder
from prefix_lightning.backbones.quantization import QUANTIZATIONS, quantize

logger = logging.getLogger(__name__)


def load_backbone(
    source: str,
    name: str,
    *,
    tokenizer: str | None = None,
    random_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    cache_dir: str | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone LM (in eval mode; quantized after loading when asked) and its tokenizer; the arguments
    are ``BackboneConfig``'s.

    The model's ``name_or_path`` is set to a portable identity (see ``backbone_identity``): ``"embedded:<name>"``,
    ``"random:<model_type>"``, or the Hub id / folder as given.
    """
    config = BackboneConfig(source, name, tokenizer, random_config, dtype, cache_dir, quantization)
    if config.source == "embedded":
        model, tok = _load_embedded(config)
    elif config.source == "hub":
        model, tok = _load_hub(config)
    else:
        model, tok = _build_random(config)
    if config.quantization is not None:
        model = quantize(model, config.quantization)
        logger.info("Quantized %s's linear layers: %s", model.name_or_path, QUANTIZATIONS[config.quantization])
    return model.eval(), tok


def backbone_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What a saved prefix records about its base model, so that loading it elsewhere can be checked."""
    return {
        "name_or_path": model.name_or_path,
        "model_type": model.config.model_type,
        "architectures": [type(model).__name__],
    }


def _load_embedded(config: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = embedded_folder(config.name, config.cache_dir)
    logger.info("Loading embedded backbone %r from %s", config.name, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=config.torch_dtype)
    tok = load_tokenizer(str(folder), cache_dir=None)
    _set_name_or_path(model, f"embedded:{config.name}")
    return model, tok


def _hub_config(name: str, cache_dir: str | None) -> PretrainedConfig:
    """A model's config alone (a few KB, no weights), with the same one-line failure as a whole model."""
    try:
        return AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    except OSError as err:
        raise OSError(f"Could not load the config of {name!r}: {_why_not_loaded(name, err)}") from err


def _why_not_loaded(name: str, err: OSError) -> str:
    # transformers explains over several lines deep in a traceback; say first which model failed and why.
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = (
        "the local folder is incomplete"
        if Path(name).is_dir()
        else "it is not a local folder and could not be found or downloaded from the Hugging Face Hub "
        "(no network, offline mode, or wrong id?)"
    )
    return f"{where}. Cause: {cause}"


def _load_hub(config: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    name, tokenizer = config.name, config.tokenizer or config.name
    try:
        hub_config = AutoConfig.from_pretrained(name, cache_dir=config.cache_dir)
        auto_class = AutoModelForSeq2SeqLM if hub_config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_pretrained(
            name, config=hub_config, dtype=config.torch_dtype, cache_dir=config.cache_dir
        )
        tok = load_tokenizer(tokenizer, cache_dir=config.cache_dir)
    except OSError as err:
        raise OSError(
            f"Could not load backbone {name!r} (tokenizer {tokenizer!r}): {_why_not_loaded(name, err)}"
        ) from err
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _build_random(config: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    assert config.tokenizer is not None and config.random_config is not None  # BackboneConfig's rule
    random_config = dict(config.random_config)
    try:
        tok = load_tokenizer(config.tokenizer, cache_dir=None)
    except OSError as err:
        raise OSError(
            f"Could not load the tokenizer {config.tokenizer!r} of the random model: "
            f"{_why_not_loaded(config.tokenizer, err).rstrip('.')}. Give a local tokenizer folder (GPT-2's "
            "vocab.json and merges.txt) with PREFIX_LIGHTNING_TOKENIZER or paths.tokenizer_dir=..."
        ) from err
    eos = tok.eos_token_id
    fields = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
    }
    if "like" in random_config:
        like = random_config.pop("like")
        model_config = _hub_config(like, config.cache_dir)
        # Named fields of the model's own tokenizer are replaced by this tokenizer's; other keys given win.
        for key, value in {**fields, **random_config}.items():
            setattr(model_config, key, value)
    else:
        try:
            model_config = AutoConfig.for_model(**{**fields, **random_config})
        except (KeyError, ValueError, StrictDataclassError) as error:
            raise _random_config_error(error) from error
    # Encoder-decoder configs default to ids of their own vocabulary (BART: decoder start 2, forced EOS 2, which is
    # "#" in GPT-2's); map them to this tokenizer's EOS, as BART does with its own, unless the caller chose.
    if model_config.is_encoder_decoder and "decoder_start_token_id" not in random_config:
        model_config.decoder_start_token_id = eos
    if getattr(model_config, "forced_eos_token_id", None) is not None and "forced_eos_token_id" not in random_config:
        model_config.forced_eos_token_id = eos
    auto_class = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    # Same weights on every call, without disturbing the caller's random state (also the GPU's, where the weights
    # are drawn there: built under ``with torch.device("cuda")``).
    default = torch.get_default_device()
    on_gpu = [torch.cuda.current_device() if default.index is None else default.index] if default.type == "cuda" else []
    with torch.random.fork_rng(devices=on_gpu):
        torch.manual_seed(0)
        try:
            model = auto_class.from_config(model_config)
        except (ValueError, AssertionError, StrictDataclassError) as error:
            raise _random_config_error(error) from error
    _set_name_or_path(model, f"random:{model_config.model_type}")
    return model.to(config.torch_dtype), tok


def _random_config_error(error: Exception) -> ValueError:
    """transformers' refusal of a ``random_config`` (fields that do not fit together, an unknown model type) in
    its first sentence, under the option's name: for an unknown type it goes on to list every known one."""
    last_line = str(error).strip().splitlines()[-1].strip().removeprefix(f"{ValueError.__name__}: ")
    return ValueError(f"model.backbone.random_config: {last_line.split('. ')[0]}")


def load_tokenizer(path_or_id: str, cache_dir: str | None) -> PreTrainedTokenizerBase:
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
    tok_class = GPT2Tokenizer if bare_bpe else AutoTokenizer
    tok = tok_class.from_pretrained(path_or_id, cache_dir=cache_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _set_name_or_path(model: PreTrainedModel, identity: str) -> None:
    model.config.name_or_path = identity
    model.name_or_path = identity
