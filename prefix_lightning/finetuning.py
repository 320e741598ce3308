"""The baselines prefix-tuning is compared with: full fine-tuning, the top layers only, LoRA, PEFT's prefix tuning.

``FineTunedLM`` gives each of them the protocol of ``PrefixModel`` (``.lm``, ``loss``, ``generate``,
``trainable_parameters``, ``train``, plus ``save``), so that one training loop, one loss and one decoding path
serve every method and the comparison differs in the method only. peft is needed for ``lora`` and
``peft_prefix`` only, and imported when one of them is built.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_lightning.atomic import atomic_write
from prefix_lightning.backbones import backbone_identity
from prefix_lightning.config import PrefixConfig
from prefix_lightning.loss import slices_logits, target_loss
from prefix_lightning.peft_prefix import peft_generate, peft_prefix_config

FINETUNING_METHODS = ("full", "top_layers", "lora", "peft_prefix")
PEFT_METHODS = ("lora", "peft_prefix")
TOP_LAYERS_WEIGHTS = "top_layers.safetensors"
TOP_LAYERS_CONFIG = "top_layers.json"
TOP_LAYERS_FORMAT = "prefix-lightning/top-layers/1"
BLOCK_LIST_NAMES = ("layers", "h", "block", "blocks")  # where models without GradientCheckpointingLayer keep them


class FineTunedLM(nn.Module):
    """An LM adapted by one of ``FINETUNING_METHODS``, with the same protocol as ``PrefixModel``.

    Unlike ``PrefixModel``, which keeps its frozen LM in eval mode, these methods train the way their users run
    them: in train mode the LM's own dropout (and LoRA's) is on, since that is the baseline the paper and PEFT's
    users compare against. ``.lm`` is the model that runs: the LM itself, or the ``PeftModel`` around it.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        method: str,
        *,
        layers: int = 2,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        prefix: PrefixConfig | None = None,
    ) -> None:
        super().__init__()
        if method not in FINETUNING_METHODS:
            raise ValueError(f"unknown fine-tuning method {method!r}; allowed: {', '.join(FINETUNING_METHODS)}")
        if method in PEFT_METHODS and importlib.util.find_spec("peft") is None:
            raise ModuleNotFoundError(f"method {method} needs peft: pip install 'peft>=0.21,<0.22'")
        self.method = method
        self.layers: int | None = None
        training = lm.training
        if method == "full":
            lm.requires_grad_(True)
        elif method == "top_layers":
            lm.requires_grad_(False)
            name, blocks = decoder_blocks(lm)
            if not isinstance(layers, int) or not 1 <= layers <= len(blocks):
                raise ValueError(f"top_layers: layers must be between 1 and {len(blocks)} ({name}), got {layers!r}")
            self.layers = layers
            for block in blocks[-layers:]:
                block.requires_grad_(True)
        elif method == "lora":
            lm = _peft_model(lm, method, _lora_config(lm, rank, alpha, dropout, target_modules))
        else:
            if lm.config.is_encoder_decoder:
                raise ValueError(
                    f"peft_prefix covers causal LMs only, not {type(lm).__name__}: PEFT's encoder-decoder prefix "
                    "generates without its prefix under transformers 5 and has no working decoding path here"
                )
            lm = _peft_model(lm, method, peft_prefix_config(prefix or PrefixConfig()))
        self.lm = lm
        # PEFT's forward takes **kwargs and hands logits_to_keep on to the causal LM it wraps (LoRA: the LM with
        # its adapted layers; prefix tuning: with the prefix as its cache), but target_loss only computes
        # target-position logits for a forward that names the argument: the loss shows it one that does.
        self._peft_slices_logits = method in PEFT_METHODS and slices_logits(lm.get_base_model())
        self.train(training)

    def loss(self, labels: torch.Tensor, length_groups: int | None = None, **inputs: Any) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens, the loss of every method (see :func:`target_loss`)."""
        lm = _LogitsToKeep(self.lm) if self._peft_slices_logits else self.lm
        return target_loss(lm, labels, length_groups, **inputs)

    def forward(self, **inputs: Any) -> Any:
        """The LM's forward (PEFT's, with its adapter, for the peft methods)."""
        return self.lm(**inputs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        """transformers' ``generate``; PEFT's prefix decodes through :func:`peft_generate`, since its own
        ``generate`` drops the prefix under transformers 5."""
        if self.method == "peft_prefix":
            return peft_generate(self.lm, **kwargs)
        return self.lm.generate(**kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """transformers' own checkpointing of the LM's layers (non-reentrant, so that no input needs a gradient);
        these methods train in train mode, where transformers checkpoints."""
        if self.method == "peft_prefix":
            raise ValueError(
                "PEFT's prefix tuning does not work with gradient checkpointing (its prefix travels as a key/value "
                "cache, which checkpointed layers do not support): set model.gradient_checkpointing=false"
            )
        lm = self.lm.get_base_model() if self.method in PEFT_METHODS else self.lm
        lm.activation_checkpointing_enable({"use_reentrant": False})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, path: str | Path) -> Path:
        """Write what the method trains, in the form its users load: the whole model (``from_pretrained``),
        the top blocks' tensors (:func:`load_top_layers`), or PEFT's adapter (``PeftModel.from_pretrained``)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if self.method == "full":
            self.lm.save_pretrained(folder)
        elif self.method in PEFT_METHODS:
            # Never the embeddings: "auto" adds them whenever it guesses the vocabulary was resized.
            self.lm.save_pretrained(folder, save_embedding_layers=False)
        else:
            tensors = {n: p.detach().contiguous().cpu() for n, p in self.lm.named_parameters() if p.requires_grad}
            description = {
                "format": TOP_LAYERS_FORMAT,
                "method": self.method,
                "layers": self.layers,
                "base_model": backbone_identity(self.lm),
            }
            metadata = {"format": TOP_LAYERS_FORMAT}
            atomic_write(folder / TOP_LAYERS_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
            atomic_write(folder / TOP_LAYERS_CONFIG, lambda tmp: tmp.write_text(json.dumps(description, indent=2)))
        return folder


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
    """Put the top blocks saved by ``FineTunedLM.save`` (method top_layers) into ``lm``; refuses tensors that
    do not fit it, since loading them partially would silently mix two models."""
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


def _lora_config(lm: PreTrainedModel, rank: int, alpha: int, dropout: float, target_modules: list[str] | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules is not None else None,
        task_type="SEQ_2_SEQ_LM" if lm.config.is_encoder_decoder else "CAUSAL_LM",
    )


def _peft_model(lm: PreTrainedModel, method: str, config: Any) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(lm, config)
    except ValueError as error:  # peft's messages name the option, not the model or the method that was asked
        hint = " (set method.target_modules to its linear layers' names)" if method == "lora" else ""
        raise ValueError(
            f"peft cannot apply {method} to {type(lm).__name__} ({lm.config.model_type}){hint}: {error}"
        ) from error


class _LogitsToKeep:
    """A PeftModel whose forward names ``logits_to_keep``, which it passes on to the wrapped causal LM."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    def forward(self, *, logits_to_keep: int | torch.Tensor = 0, **inputs: Any) -> Any:
        return self.model(**inputs, logits_to_keep=logits_to_keep)

    __call__ = forward
