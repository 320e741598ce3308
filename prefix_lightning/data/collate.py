"""Tokenization and batching shared by all text-to-text datasets, for causal and encoder-decoder LMs.

Datasets are small, so each split is tokenized once (`encode_pairs`, `encode_prompts`) and the collate
functions (`train_batch`, `generation_batch`) only pad.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefix_lightning.data.examples import Example, Group
from prefix_lightning.methods.loss import IGNORE_INDEX

logger = logging.getLogger("prefix_lightning.data")


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized training pair. Causal: `input_ids` = prompt + target, `labels` masks the prompt.
    Encoder-decoder: `input_ids` = source, `labels` = target."""

    input_ids: list[int]
    labels: list[int]

    @property
    def length(self) -> int:
        """What a batch pads the pair to, as a sort key: its tokens (causal: twice, as inputs and labels)."""
        return len(self.input_ids) + len(self.labels)


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenized generation input: one per source group, with everything needed to score the output."""

    input_ids: list[int]
    group_id: int
    source: str
    references: list[str]
    category: str


class TextToTextCollator:
    """Turns (source, target) text into model inputs for one of two layouts.

    Causal (decoder-only): prompt = source + `separator`, target = " " + target + `target_end`. Source,
    separator, target body and target end are tokenized separately without special tokens, so the
    prompt/target boundary is exact, truncation never cuts the separator or the end marker, and the same prompt
    ids are used in training and generation. `max_source_tokens` bounds the prompt (separator included),
    `max_target_tokens` the target (end marker included).

    Encoder-decoder: source and target are each tokenized with the tokenizer's own special tokens (BART:
    `<s> ... </s>`; T5: `... </s>`); `separator` and `target_end` are not used.

    Padding uses `tokenizer.pad_token_id`, or the EOS id when the tokenizer has none (GPT-2); padded
    positions are masked in `attention_mask` and `labels`, so the choice never reaches the loss. The tokenizer
    is not modified.
    """

    def __init__(
        self,
        tokenizer: Any,
        separator: str = "",
        target_end: str = "",
        is_encoder_decoder: bool = False,
        max_source_tokens: int = 256,
        max_target_tokens: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_source_tokens = max_source_tokens
        self.max_target_tokens = max_target_tokens
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_id: int = pad_id
        self._separator_ids = self._tokenize(separator)
        self._end_ids = self._tokenize(target_end)
        if not is_encoder_decoder and max_source_tokens <= len(self._separator_ids):
            raise ValueError(f"max_source_tokens={max_source_tokens} leaves no room next to the separator")
        if not is_encoder_decoder and max_target_tokens <= len(self._end_ids):
            raise ValueError(f"max_target_tokens={max_target_tokens} leaves no room next to the target end")

    def encode_pairs(self, examples: Sequence[Example], name: str) -> list[EncodedPair]:
        """Tokenize a split for teacher-forced training / loss; `name` labels the truncation warning."""
        encoded, truncated_sources, truncated_targets = [], 0, 0
        for example in examples:
            source, source_cut = self._encode_source(example.source)
            target, target_cut = self._encode_target(example.target)
            truncated_sources += source_cut
            truncated_targets += target_cut
            if self.is_encoder_decoder:
                encoded.append(EncodedPair(input_ids=source, labels=target))
            else:
                encoded.append(EncodedPair(input_ids=source + target, labels=[IGNORE_INDEX] * len(source) + target))
        self._warn_truncation(name, len(examples), truncated_sources, truncated_targets)
        return encoded

    def encode_prompts(self, groups: Sequence[Group], name: str) -> list[EncodedPrompt]:
        """Tokenize one generation input per group (a source with all its references)."""
        encoded, truncated = [], 0
        for group in groups:
            ids, cut = self._encode_source(group.source)
            truncated += cut
            encoded.append(EncodedPrompt(ids, group.group_id, group.source, group.references, group.category))
        self._warn_truncation(name, len(groups), truncated, 0)
        return encoded

    def train_batch(self, items: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask`, `labels` (-100 on prompt and padding)."""
        input_ids, attention_mask = self._pad([item.input_ids for item in items], self.pad_id, left=False)
        labels, _ = self._pad([item.labels for item in items], IGNORE_INDEX, left=False)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def generation_batch(self, items: Sequence[EncodedPrompt]) -> dict[str, Any]:
        """Prompts only, plus plain lists `group_ids`, `sources`, `references` and `categories` (empty strings
        where the dataset has none) for writing and scoring outputs.

        Causal prompts are left-padded so that generation continues right after each prompt; encoder inputs are
        right-padded, since models with absolute positions (BART) would otherwise shift the padded rows.
        """
        input_ids, attention_mask = self._pad(
            [item.input_ids for item in items], self.pad_id, left=not self.is_encoder_decoder
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "group_ids": [item.group_id for item in items],
            "sources": [item.source for item in items],
            "references": [item.references for item in items],
            "categories": [item.category for item in items],
        }

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _encode_source(self, source: str) -> tuple[list[int], bool]:
        if self.is_encoder_decoder:
            return self._encode_with_special_tokens(source, self.max_source_tokens)
        return self._encode_capped(source, self._separator_ids, self.max_source_tokens)

    def _encode_target(self, target: str) -> tuple[list[int], bool]:
        if self.is_encoder_decoder:
            return self._encode_with_special_tokens(target, self.max_target_tokens)
        return self._encode_capped(" " + target, self._end_ids, self.max_target_tokens)

    def _encode_capped(self, text: str, suffix: list[int], limit: int) -> tuple[list[int], bool]:
        """Tokens of `text` cut so that they and `suffix` fit in `limit`, then `suffix`."""
        ids = self._tokenize(text)
        room = limit - len(suffix)
        return ids[:room] + suffix, len(ids) > room

    def _encode_with_special_tokens(self, text: str, limit: int) -> tuple[list[int], bool]:
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) <= limit:
            return ids, False
        # The tokenizer's own truncation keeps the special tokens (e.g. the closing EOS).
        return self.tokenizer(text, truncation=True, max_length=limit)["input_ids"], True

    def _warn_truncation(self, name: str, total: int, sources: int, targets: int) -> None:
        if sources or targets:
            logger.warning(
                "%s: truncated %d of %d sources to max_source_tokens=%d and %d targets to max_target_tokens=%d",
                name,
                sources,
                total,
                self.max_source_tokens,
                targets,
                self.max_target_tokens,
            )

    @staticmethod
    def _pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask
