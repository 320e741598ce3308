"""PrefixModel: a frozen transformers LM whose every attention layer sees a trainable prefix."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_lightning.decoding import CachedPrefix, PackedWeights, generate
from prefix_lightning.methods import IGNORE_INDEX, target_loss
from prefix_lightning.prefix.attention import (
    INFIX_QUERIES,
    PrefixInjector,
    bind,
    record_attention_calls,
)
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.encoder import PrefixEncoder
from prefix_lightning.prefix.export import read_prefix, save_prefix
from prefix_lightning.prefix.positions import attach_position_shift
from prefix_lightning.prefix.relative_bias import prefix_bias_hooks
from prefix_lightning.prefix.sites import AttentionSite, UnsupportedModelError, discover_sites, use_prefix_attention

log = logging.getLogger(__name__)

INPUT = "input"  # the encoder of embedding-only: input embeddings, not a site group


class PrefixModel(nn.Module):
    """Wraps any supported causal or encoder-decoder LM; only the prefix is trainable.

    ``PrefixModel(lm, PrefixConfig(length=10))``, or the config's fields as keywords (``PrefixModel(lm,
    length=10)``, also on top of a config). A prefix initialized from words (``init_text``) needs the tokenizer.
    The LM is frozen and kept in eval mode (no LM dropout) whatever mode the wrapper is in. Call the wrapper,
    not ``.lm``: each forward/generate materializes the prefix once and every layer reads it.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        config: PrefixConfig | Mapping[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.config = PrefixConfig.of(config, **fields)
        self.lm = lm
        lm.requires_grad_(False)
        lm.eval()
        use_prefix_attention(lm)
        kind = self.config.kind
        if kind != "prefix" and lm.config.is_encoder_decoder:
            raise UnsupportedModelError(f"prefix kind {kind!r} is for decoder-only LMs; {type(lm).__name__} is not one")
        self.injector = PrefixInjector(infix=kind == "infix")
        bound = discover_sites(lm)
        self.sites: list[AttentionSite] = [site for _, site in bound]
        bias_hooks = prefix_bias_hooks(bound, self.config.shift_positions)
        groups: dict[str, list[AttentionSite]] = {}
        for module, site in bound:
            index = len(groups.setdefault(site.group, []))
            bind(module, self.injector, site.group, index, bias_hooks.get(module))
            groups[site.group].append(site)
        # transformers types the embeddings as a plain Module.
        embed_dim: int = lm.get_input_embeddings().embedding_dim  # type: ignore[assignment]
        shapes: dict[str, list[tuple[int, ...]]]
        if kind == "embedding":
            shapes = {INPUT: [(embed_dim,)]}
        else:  # every site keeps its own shape
            shapes = {group: [(2, site.kv_heads, site.head_dim) for site in sites] for group, sites in groups.items()}
        self.encoders = nn.ModuleDict(
            {group: PrefixEncoder(self.config, shape, embed_dim) for group, shape in shapes.items()}
        )
        # A relative position bias (T5) places the prefix by itself (prefix.relative_bias); absolute positions move.
        if self.config.shift_positions and not bias_hooks:
            attach_position_shift(lm, self.config.length, self.injector)
        self.packed_weights = PackedWeights()  # the frozen LM's weights packed for decoding on CPU
        self._initialize(tokenizer)

    @property
    def virtual_positions(self) -> int:
        return self.config.length if self.config.shift_positions else 0

    # -- running -------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PrefixModel:
        super().train(mode)
        self.lm.eval()
        if mode:  # back to training: the packed copy of the weights is not needed until the next decoding
            self.packed_weights.clear()
        return self

    def materialized(self, dropout: float = 0.0) -> dict[str, list[torch.Tensor]]:
        """Each site group's prefix keys/values, one (2, kv_heads, L, head_dim) block per site, in the graph.

        Embedding-only computes them as the frozen LM's own activations of the trainable input embeddings, at
        positions 0..L-1: exactly what the LM would hold for those embeddings in front of the input.
        """
        blocks = {group: encoder(dropout) for group, encoder in self.encoders.items()}
        if self.config.kind == "embedding":
            return self._activations(inputs_embeds=blocks[INPUT][0][None])
        return blocks

    def _materialize(self) -> None:
        self.injector.prefixes = self.materialized(self.config.dropout if self.training else 0.0)

    def _activations(self, **inputs: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The plain LM's keys/values of one sequence in every attention site, grouped like the prefix."""
        with self.prefix_disabled(), record_attention_calls() as calls:
            self.lm(**inputs, use_cache=False)
        by_module = {id(call.module): call for call in calls}
        named = dict(self.lm.named_modules())
        groups: dict[str, list[torch.Tensor]] = {}
        for site in self.sites:
            call = by_module[id(named[site.name])]
            groups.setdefault(site.group, []).append(torch.stack([call.key[0], call.value[0]]))
        return groups

    def _with_infix_queries(self, inputs: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
        """An infix is read from the token that predicts the target's first token on (see ``infix_rows``)."""
        if not self.injector.infix:
            return inputs
        index = torch.arange(labels.shape[1], device=labels.device)
        first_target = (labels != IGNORE_INDEX).int().argmax(1, keepdim=True)
        return {**inputs, INFIX_QUERIES: index >= first_target - 1}

    def forward(self, **inputs: Any) -> Any:
        """The LM's forward (loss, logits, ...) with the prefix in every attention layer."""
        self._materialize()
        if "labels" in inputs:
            inputs = self._with_infix_queries(inputs, inputs["labels"])
        return self.lm(**inputs)

    def loss(self, labels: torch.Tensor, length_groups: int | None = None, **inputs: Any) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens (see :func:`target_loss`); the prefix is
        materialized once for the whole batch."""
        self._materialize()
        return target_loss(self.lm, labels, length_groups, **self._with_infix_queries(inputs, labels))

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        """transformers' ``generate`` with the prefix; beams and batch rows share it without copies (the route
        each call takes is :func:`prefix_lightning.decoding.generate`'s)."""
        self._materialize()
        input_ids = kwargs.get("input_ids")
        self.injector.prompt_width = input_ids.shape[1] if input_ids is not None else None
        try:
            return generate(self.lm, kwargs, self.packed_weights, self._cached_prefix())
        finally:
            self.injector.prompt_width = None

    def _cached_prefix(self) -> CachedPrefix | None:
        """The prefix as cache entries for the steps after the prompt (a decoder-only LM whose attention modules
        name their cache layer), with attention's own route turned off meanwhile."""
        if not self.injector.enabled or self.injector.prefixes is None or self.lm.config.is_encoder_decoder:
            return None
        named = dict(self.lm.named_modules())
        counters: dict[str, int] = {}
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for site in self.sites:
            index = counters.get(site.group, 0)
            counters[site.group] = index + 1
            layer = getattr(named[site.name], "layer_idx", None)
            if not isinstance(layer, int) or layer in layers:
                return None
            block = self.injector.prefixes[site.group][index]
            layers[layer] = (block[0], block[1])
        return CachedPrefix(layers, self.virtual_positions, self.prefix_disabled) if layers else None

    @contextmanager
    def prefix_disabled(self) -> Iterator[None]:
        """Run the plain LM (no prefix, usual positions) inside the block."""
        with self.injector.disabled():
            yield

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the frozen LM's layers in backward instead of storing their activations.

        transformers only checkpoints layers in training mode, and the LM stays in eval mode here (no dropout),
        so the layers are wrapped directly with non-reentrant checkpointing, which lets gradients reach the
        prefix that the layers read from outside their inputs.
        """
        for module in self.lm.modules():
            if isinstance(module, GradientCheckpointingLayer) and "forward" not in vars(module):
                module.forward = partial(_checkpointed, module)

    # -- inspection ----------------------------------------------------------------------------------------
    def prefix_key_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The materialized prefix per attention module name: (keys, values), each (kv_heads, L, head_dim)."""
        prefixes = self.materialized()
        counters: dict[str, int] = {}
        result = {}
        for site in self.sites:
            index = counters.get(site.group, 0)
            counters[site.group] = index + 1
            block = prefixes[site.group][index]
            result[site.name] = (block[0], block[1])
        return result

    @property
    def prefix_encoders(self) -> dict[str, PrefixEncoder]:
        """The trainable part by group (``self.encoders``, whose nn.ModuleDict types its values as plain Modules)."""
        return {group: cast(PrefixEncoder, encoder) for group, encoder in self.encoders.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- initialization ------------------------------------------------------------------------------------
    def _initialize(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Random (the encoder's own init), from real words (``init_text``) or drawn tokens (``init_vocab``)."""
        if self.config.init_text is not None:
            if tokenizer is None:
                raise ValueError("a prefix initialized from words (init_text) needs the tokenizer: pass tokenizer=")
            self.init_prefix_from_tokens(tokenizer(self.config.init_text, add_special_tokens=False).input_ids)
            log.info("prefix initialized from the words %r", self.config.init_text)
        elif self.config.init_vocab:
            self.init_prefix_from_vocabulary()
            log.info("prefix initialized from %d tokens drawn from the vocabulary", self.config.length)

    @torch.no_grad()
    def init_prefix_from_tokens(self, token_ids: Sequence[int] | torch.Tensor) -> None:
        """Set the prefix to the LM's own keys/values for these tokens (real-word initialization), or for
        embedding-only to their input embeddings.

        The tokens are repeated or cut to the prefix length. With the MLP reparametrization, P' starts at the
        tokens' input embeddings and the MLP is fitted to reproduce the target values.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        length = self.config.length
        if ids.numel() == 0:
            raise ValueError("init_prefix_from_tokens needs at least one token")
        if ids.numel() != length:
            log.info("prefix init: %d tokens repeated/cut to the prefix length %d", ids.numel(), length)
            ids = ids.repeat(length // ids.numel() + 1)[:length]
        ids = ids.to(self.lm.device)[None]
        start = self.lm.get_input_embeddings()(ids)[0].float()
        if self.config.kind == "embedding":
            targets = {INPUT: [start]}
        else:
            inputs = {"input_ids": ids}
            if self.lm.config.is_encoder_decoder:
                inputs["decoder_input_ids"] = ids
            activations = self._activations(**inputs)
            targets = {group: [block.float() for block in blocks] for group, blocks in activations.items()}
        for group, encoder in self.prefix_encoders.items():
            if encoder.mlp is None:
                encoder.assign(targets[group])
            else:
                error = encoder.fit(targets[group], start)
                log.info("prefix init of the %s block: MLP fitted to relative error %.2e", group, error)

    def init_prefix_from_vocabulary(self, generator: torch.Generator | None = None) -> None:
        """Initialize from L tokens drawn uniformly from the vocabulary (the LM's activations of real tokens,
        without choosing words)."""
        # transformers types the embeddings as a plain Module.
        vocabulary: int = self.lm.get_input_embeddings().num_embeddings  # type: ignore[assignment]
        self.init_prefix_from_tokens(torch.randint(vocabulary, (self.config.length,), generator=generator))

    # -- export --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write what trains, materialized (MLP dropped), and its description to the folder ``path``: the
        prefix's (or infix's) keys/values, or embedding-only's input embeddings."""
        with torch.no_grad():
            blocks = {group: encoder() for group, encoder in self.encoders.items()}
        return save_prefix(Path(path), blocks, self.config, self.lm, self.sites)

    @classmethod
    def from_prefix(cls, lm: PreTrainedModel, path: str | Path) -> PrefixModel:
        """Load an exported prefix onto ``lm``; refuses a base model of another shape."""
        exported = read_prefix(path)
        model = cls(lm, exported.config)
        exported.check_fits(lm, model.sites)
        encoders = model.prefix_encoders
        blocks = exported.blocks({group: encoder.block_shapes() for group, encoder in encoders.items()})
        for group, encoder in encoders.items():
            encoder.assign([block.to(encoder.prefix.device) for block in blocks[group]])
        return model


def _checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own forward, recomputed in backward (a partial of this function pickles with the model)."""
    forward = partial(type(module).forward, module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
