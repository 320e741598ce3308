"""PrefixModel: a frozen transformers LM whose every attention layer sees a trainable prefix."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefix_lightning.backbones import hub_name
from prefix_lightning.decoding import CachedPrefix, generate, tokens_to_generate
from prefix_lightning.methods import IGNORE_INDEX, target_loss
from prefix_lightning.prefix.attention import INFIX_QUERIES, PrefixInjector
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.encoder import INPUT, PrefixEncoder, prefix_encoders, typed_encoders
from prefix_lightning.prefix.export import CONFIG_NAME, WEIGHTS_NAME, load_blocks, read_prefix, save_prefix
from prefix_lightning.prefix.inputs import check_inputs
from prefix_lightning.prefix.peft_format import (
    PEFT_CONFIG,
    PEFT_LEGACY_WEIGHTS,
    PEFT_WEIGHTS,
    peft_incompatibility,
    read_peft_prefix,
    save_peft_prefix,
)
from prefix_lightning.prefix.positions import (
    attach_position_shift,
    check_positions,
    position_count,
    position_embedding_modules,
)
from prefix_lightning.prefix.sites import (
    AttentionSite,
    UnsupportedModelError,
    attention_sites,
    site_modules,
)
from prefix_lightning.prefix.wiring import (
    FrozenLMWrapper,
    bind_sites,
    cache_layers,
    checkpoint_layers,
    site_activations,
    site_keys,
)

log = logging.getLogger(__name__)


class PrefixModel(FrozenLMWrapper):
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
        settings = PrefixConfig.of(config, **fields)
        super().__init__(lm)
        self.config = settings
        positions = position_count(lm.config)
        if settings.shift_positions and positions is not None and settings.length >= positions:
            raise ValueError(
                f"prefix.length={settings.length} leaves no position for the real tokens: {type(lm).__name__} "
                f"has {positions} positions (prefix.shift_positions=false keeps the real tokens at theirs)"
            )
        kind = self.config.kind
        if kind != "prefix" and lm.config.is_encoder_decoder:
            raise UnsupportedModelError(f"prefix kind {kind!r} is for decoder-only LMs; {type(lm).__name__} is not one")
        if kind == "embedding" and getattr(lm.config, "hidden_size_per_layer_input", None):
            raise UnsupportedModelError(
                f"an embedding-only prefix is input embeddings, and {type(lm).__name__} computes per-layer inputs from "
                "the token ids, which virtual tokens do not have (Gemma 3n/4): use the prefix kind 'prefix'"
            )
        if kind == "infix" and settings.shift_positions and position_embedding_modules(lm):
            raise UnsupportedModelError(
                f"an infix moves only the tokens after it, and {type(lm).__name__}'s position embeddings move all of "
                "a sequence's: use the prefix kind 'prefix', or prefix.shift_positions=false"
            )
        self.injector = PrefixInjector(infix=kind == "infix", shift=self.config.virtual_positions)
        self.sites: list[AttentionSite] = bind_sites(lm, self.injector, self.config.shift_positions)
        # transformers types the embeddings as a plain Module.
        embed_dim: int = lm.get_input_embeddings().embedding_dim  # type: ignore[assignment]
        # Made where the LM is: an LM already on a GPU trains, exports and loads in place.
        self.encoders = prefix_encoders(self.config, self.sites, embed_dim).to(lm.device)
        # A relative position bias (T5) places the prefix by itself (prefix.relative_bias); absolute positions move.
        if self.config.shift_positions and not any(site.position_bias for site in self.sites):
            attach_position_shift(lm, self.injector)
        elif not self.config.shift_positions and not lm.config.is_encoder_decoder:
            # Unshifted, positions are still counted from the 2-D mask, as generate and a PrefixBank count them: a
            # left-padded row would otherwise take its pads' positions, and its distance to the prefix would depend
            # on its padding.
            with suppress(UnsupportedModelError):  # positions the hook cannot reach: the model counts them itself
                attach_position_shift(lm, self.injector)
        self._checkpointing = False
        self._initialize(tokenizer)

    @property
    def virtual_positions(self) -> int:
        return self.config.virtual_positions

    # -- running -------------------------------------------------------------------------------------------
    def materialized(self, dropout: float = 0.0) -> dict[str, list[torch.Tensor]]:
        """Each site group's prefix keys/values, one (2, kv_heads, L, head_dim) block per site, in the graph.

        Embedding-only computes them as the frozen LM's own activations of the trainable input embeddings, at
        positions 0..L-1: exactly what the LM would hold for those embeddings in front of the input. The embeddings
        train in float32 and enter an LM stored in another precision (bf16) in its own.
        """
        blocks = {group: encoder(dropout) for group, encoder in self.encoders.items()}
        if self.config.kind == "embedding":
            return self._activations(inputs_embeds=blocks[INPUT][0][None].to(self.lm.dtype))
        return blocks

    def _materialize(self) -> None:
        self.injector.prefixes = self.materialized(self.config.dropout if self.training else 0.0)

    def _activations(self, **inputs: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The plain LM's keys/values of one sequence in every attention site, grouped like the prefix."""
        groups: dict[str, list[torch.Tensor]] = {}
        for site, block in zip(self.sites, site_activations(self.lm, self.injector, self.sites, **inputs), strict=True):
            groups.setdefault(site.group, []).append(block)
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
        self._check_inputs(inputs)
        self._materialize()
        if "labels" in inputs:
            inputs = self._with_infix_queries(inputs, inputs["labels"])
        if self._checkpointing and torch.is_grad_enabled():  # a recomputed layer would add to the cache again
            inputs = {**inputs, "use_cache": False}
        return self.lm(**inputs)

    def loss(
        self,
        labels: torch.Tensor,
        length_groups: int | None = None,
        drop_right_padding_mask: bool | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens (see :func:`target_loss`); the prefix is
        materialized once for the whole batch. ``drop_right_padding_mask`` None: on accelerators only (the CPU's
        masked path is faster there)."""
        self._check_inputs({**inputs, "labels": labels})
        self._materialize()
        inputs = self._with_infix_queries(inputs, labels)
        if drop_right_padding_mask is None:
            drop_right_padding_mask = labels.device.type != "cpu"
        return target_loss(self.lm, labels, length_groups, drop_right_padding_mask=drop_right_padding_mask, **inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` with the prefix (the token ids may come first, as there); beams and batch
        rows share it without copies (the route each call takes is :func:`prefix_lightning.decoding.generate`'s)."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        self._check_inputs(kwargs, tokens_to_generate(self.lm, kwargs))
        self._materialize()
        # An infix is read from the prompt's last token on, whichever way the prompt comes.
        prompt = next(
            (kwargs[key] for key in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(key) is not None), None
        )
        self.injector.prompt_width = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.ndim >= 2 else None
        try:
            return generate(self.lm, kwargs, self.packed_weights, self._cached_prefix())
        finally:
            self.injector.prompt_width = None

    def _check_inputs(self, inputs: dict[str, Any], generated: int = 0) -> None:
        """Refuse inputs the LM would fail on deep inside (``generated``: the tokens generate adds)."""
        check_inputs(self.lm, inputs)
        check_positions(self.lm, self.injector, inputs, self._largest_shift(inputs, generated), generated)

    def _largest_shift(self, inputs: dict[str, Any], generated: int) -> int:
        """How far the prefix moves a call's real tokens: an infix moves only the tokens after it, the labels'
        target (or the tokens ``infix_queries`` names) and generated tokens; a call without them is all source."""
        if not self.injector.enabled:
            return 0
        if self.injector.infix and not (generated or "labels" in inputs or INFIX_QUERIES in inputs):
            return 0
        return self.injector.shift

    def _cached_prefix(self) -> CachedPrefix | None:
        """The prefix as cache entries for the steps after the prompt (a decoder-only LM whose attention modules
        name their cache layer), with attention's own route turned off meanwhile."""
        layers = cache_layers(self.lm, self.sites)
        if not self.injector.enabled or self.injector.prefixes is None or layers is None:
            return None
        prefixes = self.injector.prefixes
        keys = site_keys(self.sites)
        blocks = {layer: prefixes[group][index] for layer, (group, index) in zip(layers, keys, strict=True)}
        return CachedPrefix(blocks, self.virtual_positions, self.prefix_disabled)

    @contextmanager
    def prefix_disabled(self) -> Iterator[None]:
        """Run the plain LM (no prefix, usual positions) inside the block."""
        with self.injector.disabled():
            yield

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the frozen LM's layers in backward instead of storing their activations (see
        :func:`checkpoint_layers`); a forward that computes gradients then keeps no cache."""
        checkpoint_layers(self.lm)
        self._checkpointing = True

    # -- inspection ----------------------------------------------------------------------------------------
    def prefix_key_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The materialized prefix per attention module name: (keys, values), each (kv_heads, L, head_dim)."""
        prefixes = self.materialized()
        return {
            site.name: (prefixes[group][index][0], prefixes[group][index][1])
            for site, (group, index) in zip(self.sites, site_keys(self.sites), strict=True)
        }

    @property
    def prefix_encoders(self) -> dict[str, PrefixEncoder]:
        """The trainable part by group."""
        return typed_encoders(self.encoders)

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
        vocabulary: int = self.lm.get_input_embeddings().num_embeddings  # type: ignore[assignment]
        if ids.min() < 0 or ids.max() >= vocabulary:
            raise ValueError(f"init_prefix_from_tokens: token ids must be in 0..{vocabulary - 1}, got {ids.tolist()}")
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
    def save(self, path: str | Path, format: str | None = None) -> Path:
        """Write what trains, materialized (MLP dropped), to the folder ``path`` (see :func:`write_prefix`)."""
        with torch.no_grad():
            blocks = {group: encoder() for group, encoder in self.encoders.items()}
        return write_prefix(Path(path), blocks, self.config, self.lm, self.sites, format)

    def peft_incompatibility(self) -> str | None:
        """Why PEFT's prefix tuning cannot hold this prefix, or None."""
        return peft_incompatibility(self.config, self.sites, bool(self.lm.config.is_encoder_decoder))

    @torch.no_grad()
    def set_prefix_key_values(self, key_values: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The inverse of :meth:`prefix_key_values`: set a direct prefix (``reparam="none"``) to the given keys and
        values, each (kv_heads, L, head_dim) of that site's shape, per attention module name."""
        if self.config.kind == "embedding":
            raise ValueError("an embedding-only prefix is input embeddings, not keys/values per attention module")
        if self.config.reparam != "none":
            raise ValueError(
                "set_prefix_key_values sets a direct prefix (reparam='none'); this one is trained through its MLP "
                "(reparam='mlp'): build the model with reparam='none' (from_prefix loads one so)"
            )
        missing = [site.name for site in self.sites if site.name not in key_values]
        if missing:
            raise ValueError(f"no keys/values given for the attention modules {missing[:3]}")
        groups: dict[str, list[torch.Tensor]] = {}
        for site in self.sites:
            groups.setdefault(site.group, []).append(torch.stack(key_values[site.name]))
        for group, encoder in self.prefix_encoders.items():
            shapes = encoder.block_shapes()
            given = [tuple(block.shape) for block in groups[group]]
            if given != shapes:
                raise ValueError(f"the {group} prefix blocks should be {shapes}, got {given}")
            encoder.assign([block.to(encoder.prefix.device, encoder.prefix.dtype) for block in groups[group]])

    @classmethod
    def from_prefix(cls, lm: PreTrainedModel, path: str | Path) -> PrefixModel:
        """Load an exported prefix onto ``lm``; refuses a base model of another shape."""
        exported = read_prefix(path)
        blocks = exported.fitted_blocks(lm, attention_sites(lm))  # before lm is wrapped: a refusal leaves it as it was
        model = cls(lm, exported.config)
        load_blocks(model.prefix_encoders, blocks)
        return model

    @classmethod
    def from_peft(cls, lm: PreTrainedModel, path: str | Path) -> PrefixModel:
        """Load a PEFT prefix-tuning adapter (saved with or without PEFT's ``prefix_projection``: PEFT saves the
        projected values) onto the decoder-only ``lm``; refuses a base model of another shape, warns where the
        adapter names another base model (PEFT records no model type to refuse one of the same shape by)."""
        adapter = read_peft_prefix(path)
        names = (lm.name_or_path, hub_name(lm.name_or_path))
        if adapter.base_model and lm.name_or_path and adapter.base_model not in names:
            log.warning(
                "the PEFT prefix in %s was trained on %s; this base model is %s", path, adapter.base_model, names[0]
            )
        config = PrefixConfig(length=adapter.length, reparam="none", shift_positions=True)
        found = attention_sites(lm)  # checked before lm is wrapped: a refused adapter leaves it as it was
        reason = peft_incompatibility(config, found, bool(lm.config.is_encoder_decoder))
        if reason is not None:
            raise ValueError(f"cannot load the PEFT prefix in {path} onto {type(lm).__name__}: {reason}")
        sites = {site.name: site for site in found}
        by_layer = [sites[name] for name in names_by_layer(lm, found)]
        layers = adapter.key_values(by_layer)
        model = cls(lm, config)
        model.set_prefix_key_values({site.name: pair for site, pair in zip(by_layer, layers, strict=True)})
        return model


SAVE_FORMATS = (None, "prefix-lightning", "peft")


def write_prefix(
    folder: Path,
    blocks: dict[str, list[torch.Tensor]],
    config: PrefixConfig,
    lm: PreTrainedModel,
    sites: Sequence[AttentionSite],
    format: str | None = None,
) -> Path:
    """Export one prefix: ``blocks`` as its encoders give them per group (MLP dropped), on ``lm``'s ``sites``.

    ``format="prefix-lightning"``: this project's folder (the prefix's or infix's keys/values, or embedding-only's
    input embeddings, and their description); ``"peft"``: PEFT's prefix-tuning adapter, which
    ``peft.PeftModel.from_pretrained(lm, path)`` loads (see ``peft_format``); None: ours, plus PEFT's files where
    PEFT can hold this prefix.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is not one of {SAVE_FORMATS}")
    if folder.exists() and not folder.is_dir():  # mkdir's own words: "File exists"
        raise NotADirectoryError(f"{folder} is a file: a prefix is saved into a folder (of several files)")
    if format != "peft":
        save_prefix(folder, blocks, config, lm, sites)
    reason = peft_incompatibility(config, sites, bool(lm.config.is_encoder_decoder))
    if format == "peft" and reason is not None:
        raise ValueError(f"PEFT cannot load this prefix: {reason}")
    peft = format == "peft" or (format is None and reason is None)
    if peft:
        # PEFT holds only prefixes of kind "prefix", whose blocks are each site's (keys, values).
        by_name = {
            site.name: blocks[group][index] for site, (group, index) in zip(sites, site_keys(sites), strict=True)
        }
        in_layers = {name: (by_name[name][0], by_name[name][1]) for name in names_by_layer(lm, sites)}
        save_peft_prefix(folder, in_layers, config, hub_name(lm.name_or_path))  # a base model PEFT can fetch
    # A folder saved into before keeps no files of a format not written now: they would hold the earlier prefix.
    stale: tuple[str, ...] = ()
    if format == "peft":
        stale = (CONFIG_NAME, WEIGHTS_NAME)
    elif not peft:
        stale = (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_LEGACY_WEIGHTS)
    for name in stale:
        if (folder / name).is_file():
            (folder / name).unlink()
            log.info("removed %s, left by an earlier prefix saved in %s", name, folder)
    return folder


def names_by_layer(lm: PreTrainedModel, sites: Sequence[AttentionSite]) -> list[str]:
    """The attention modules bottom to top, as a cache numbers them (``layer_idx``), else as found."""
    layers = [getattr(module, "layer_idx", None) for module in site_modules(lm, sites)]
    names = [site.name for site in sites]
    if all(isinstance(layer, int) for layer in layers):
        return [name for _, name in sorted(zip(layers, names, strict=True))]
    return names
