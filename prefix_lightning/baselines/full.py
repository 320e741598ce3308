"""Full fine-tuning: every weight of the LM trains (the paper's main baseline)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from prefix_lightning.backbones.quantization import refuse_quantized
from prefix_lightning.baselines.base import FineTunedLM


class FullFineTuning(FineTunedLM):
    trains_lm_weights = True  # refused on a quantized LM (before it loads: training/checks.py)

    def __init__(self, lm: PreTrainedModel) -> None:
        refuse_quantized(lm, "full fine-tuning")
        lm.requires_grad_(True)
        super().__init__(lm)

    def save(self, path: str | Path) -> Path:
        """The whole model, as ``from_pretrained`` loads it."""
        return self._save_pretrained(path)

    @classmethod
    def from_export(cls, lm: PreTrainedModel, path: str | Path) -> FullFineTuning:
        """The fine-tuned model saved by :meth:`save`, of ``lm``'s class and dtype (``lm`` itself is replaced)."""
        try:
            tuned = type(lm).from_pretrained(path, dtype=lm.dtype)
        except OSError as error:
            raise ValueError(f"no readable fine-tuned model in {path}: {' '.join(str(error).split())}") from error
        return cls(tuned.eval())
