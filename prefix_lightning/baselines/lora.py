"""LoRA through peft: rank-r updates of the attention projections."""

from __future__ import annotations

from transformers import PreTrainedModel

from prefix_lightning.baselines.peft_adapter import PeftAdapter, require_peft
from prefix_lightning.numbers import is_int


class LoRA(PeftAdapter):
    """``target_modules`` None takes peft's default for the architecture."""

    method = "lora"

    def __init__(
        self,
        lm: PreTrainedModel,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
    ) -> None:
        if not is_int(rank) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        require_peft("lora")
        from peft import LoraConfig

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules) if target_modules is not None else None,
            task_type="SEQ_2_SEQ_LM" if lm.config.is_encoder_decoder else "CAUSAL_LM",
        )
        super().__init__(lm, config)
