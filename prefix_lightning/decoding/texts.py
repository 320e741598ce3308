"""What ``generate`` wrote, as text: the same for a run's validation and test and for decoding new inputs."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generated_texts(
    output: torch.Tensor, prompt_width: int, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """Each row's new tokens as stripped text: a causal LM's output starts with its ``prompt_width`` prompt tokens,
    an encoder-decoder's holds new tokens only."""
    if not lm.config.is_encoder_decoder:
        output = output[:, prompt_width:]
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
