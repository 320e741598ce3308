"""Baselines that train a PEFT adapter around the LM (LoRA, PEFT's prefix tuning): building, loss and export.

peft is an optional dependency (extras ``peft``, ``dev``): it is imported only when such a method is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from prefix_lightning.baselines.base import FineTunedLM
from prefix_lightning.methods import slices_logits, target_loss


class PeftAdapter(FineTunedLM):
    """``.lm`` is the ``PeftModel`` that wraps the LM with the adapter described by ``peft_config``."""

    lm: Any  # the PeftModel (peft is optional; it stands in for the protocol's PreTrainedModel)
    method = "peft"  # the method's name in messages

    def __init__(self, lm: PreTrainedModel, peft_config: Any) -> None:
        self._wrap(lm, _peft_model(lm, peft_config, self.method))

    def _wrap(self, lm: PreTrainedModel, peft_model: Any) -> None:
        training = lm.training
        FineTunedLM.__init__(self, peft_model)
        self.train(training)
        # PEFT's forward takes **kwargs and hands logits_to_keep on to the causal LM it wraps (LoRA: the LM with
        # its adapted layers; prefix tuning: with the prefix as its cache), but target_loss only computes
        # target-position logits for a forward that names the argument: the loss shows it one that does.
        self._slices_logits = slices_logits(lm)

    @classmethod
    def from_export(cls, lm: PreTrainedModel, path: str | Path) -> PeftAdapter:
        """``lm`` with the adapter saved by :meth:`save`, as ``PeftModel.from_pretrained`` loads it (inference
        mode: PEFT's prefix is then its saved table, the MLP's output)."""
        require_peft(cls.method)
        from peft import PeftModel

        adapter = cls.__new__(cls)  # built from the folder, not from settings: __init__ would make a fresh adapter
        try:
            peft_model = PeftModel.from_pretrained(lm, str(path))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"no readable {cls.method} adapter in {path}: {' '.join(str(error).split())}") from error
        adapter._wrap(lm, peft_model)
        return adapter

    def loss(self, labels: torch.Tensor, length_groups: int | None = None, **inputs: Any) -> torch.Tensor:
        lm = _LogitsToKeep(self.lm) if self._slices_logits else self.lm
        return target_loss(lm, labels, length_groups, **inputs)

    def enable_gradient_checkpointing(self) -> None:
        self.lm.get_base_model().activation_checkpointing_enable({"use_reentrant": False})

    def save(self, path: str | Path) -> Path:
        """PEFT's adapter folder, as ``PeftModel.from_pretrained`` loads it."""
        # Never the embeddings: "auto" adds them whenever it guesses the vocabulary was resized.
        return self._save_pretrained(path, save_embedding_layers=False)


def require_peft(method: str) -> None:
    if importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError(f"method {method} needs peft: pip install 'prefix-lightning[peft]'")


def _peft_model(lm: PreTrainedModel, config: Any, method: str) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(lm, config)
    except ValueError as error:  # peft's messages name the option, not the model or the method that was asked
        hint = " (set method.model.target_modules to its linear layers' names)" if method == "lora" else ""
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
