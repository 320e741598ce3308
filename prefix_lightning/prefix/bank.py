"""PrefixBank: many prefixes on one frozen LM, each row of a batch reading its own (or none).

Prefix-tuning's modularity (the paper's Section 1): one LM in memory serves many tasks or users, each a prefix of a
few hundred kilobytes, and one batch mixes them. Row i of a mixed batch gives what a ``PrefixModel`` holding row
i's prefix gives for that row alone (logits, greedy and beam-search outputs); a row whose prefix is None gives the
plain LM's. Prefixes may differ in length, and in kind where both are keys/values in front of every layer
("prefix" and "embedding"); an infix, which only the target reads, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from prefix_lightning.decoding import CachedPrefix, generate, tokens_to_generate
from prefix_lightning.methods import target_loss
from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.encoder import INPUT, site_token_shapes
from prefix_lightning.prefix.export import read_prefix
from prefix_lightning.prefix.inputs import check_inputs
from prefix_lightning.prefix.model import PrefixModel
from prefix_lightning.prefix.positions import attach_position_shift, check_positions
from prefix_lightning.prefix.rows import RowInjector, RowPrefixes
from prefix_lightning.prefix.sites import AttentionSite, UnsupportedModelError
from prefix_lightning.prefix.wiring import (
    FrozenLMWrapper,
    bind_sites,
    cache_layers,
    checkpoint_layers,
    site_activations,
    site_keys,
)

PrefixNames = Sequence[str | None]


class HeldPrefix(Protocol):
    """What a bank holds under a name: the prefix's config and its keys/values at every site, (2, kv_heads, L,
    head_dim) each, in the bank's site order (a ``StoredPrefix``, or a trainable one such as multi-task training's)."""

    config: PrefixConfig

    def site_blocks(self) -> list[torch.Tensor]: ...


class StoredPrefix(nn.Module):
    """One prefix held by a bank: its config and its keys/values at every attention site, (2, kv_heads, L,
    head_dim) each, as buffers (they move with the bank)."""

    def __init__(self, config: PrefixConfig, blocks: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self.count = len(blocks)
        for index, block in enumerate(blocks):
            self.register_buffer(f"site_{index}", block)

    def site_blocks(self) -> list[torch.Tensor]:
        return [getattr(self, f"site_{index}") for index in range(self.count)]


class PrefixBank(FrozenLMWrapper):
    """Wraps a frozen LM once; holds named prefixes; each call says which prefix every row reads.

    ``bank.add(name, folder_or_prefix_model)``, ``bank.remove(name)``, ``bank.names()``;
    ``bank(input_ids=..., attention_mask=..., prefixes=[name or None per row], labels=...)`` is the LM's forward;
    ``bank.generate(..., prefixes=[...])`` is ``PrefixModel.generate``'s (transformers' ``generate`` contract).
    A batch whose rows all read one prefix runs exactly as a ``PrefixModel`` does.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__(lm)
        self.injector = RowInjector()
        # Sites are bound as for prefixes with positions; an entry without them gets zero bias (see rows.py).
        self.sites: list[AttentionSite] = bind_sites(lm, self.injector, shift_positions=True)
        self.injector.places = {key: place for place, key in enumerate(site_keys(self.sites))}
        self.injector.biased = any(site.position_bias for site in self.sites)
        self._cannot_shift: str | None = None
        if not self.injector.biased:  # a relative position bias (T5) places the prefix by itself
            try:
                attach_position_shift(lm, self.injector)
            except UnsupportedModelError as error:  # only prefixes with positions need it
                self._cannot_shift = str(error)
        self.entries = nn.ModuleDict()
        self._length_groups_allowed = True

    # -- the prefixes held -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def add(self, name: str, prefix: str | Path | PrefixModel) -> None:
        """Hold ``prefix`` under ``name``: an exported prefix folder, or a (trained) ``PrefixModel``'s current
        values. Refuses a prefix trained for another base model, and an infix."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"a prefix name must be a non-empty string without '.', got {name!r}")
        if name in self.entries:
            raise ValueError(f"the bank already holds a prefix named {name!r}: remove it first")
        config, blocks = self._from_model(prefix) if isinstance(prefix, PrefixModel) else self._from_folder(prefix)
        if config.kind == "infix":
            raise ValueError(
                f"{name!r} is an infix, which only the target reads ([x; INFIX; y]): a bank mixes prefixes and "
                "embedding-only prefixes; decode an infix with PrefixModel"
            )
        if config.shift_positions and self._cannot_shift is not None:
            raise UnsupportedModelError(self._cannot_shift)
        device = next(self.lm.parameters()).device
        entry = StoredPrefix(config, [block.detach().float().to(device) for block in blocks])
        self.hold(name, entry)

    def hold(self, name: str, entry: nn.Module) -> None:
        """Hold any prefix module under ``name``: one with a ``config`` and ``site_blocks()`` (a block per site, in
        the bank's site order), e.g. a trainable one (``MultiTaskPrefix``)."""
        try:
            self.entries[name] = entry
        except KeyError as error:  # a name nn.ModuleDict keeps for itself
            raise ValueError(f"{name!r} cannot name a prefix ({error.args[0]}); choose another name") from error

    def held(self, name: str) -> HeldPrefix:
        """The prefix held under ``name``."""
        self._known([name])
        return cast(HeldPrefix, self.entries[name])

    def remove(self, name: str) -> None:
        self._known([name])
        del self.entries[name]

    def _from_model(self, model: PrefixModel) -> tuple[PrefixConfig, list[torch.Tensor]]:
        describe = [(site.name, site.group, site.kv_heads, site.head_dim) for site in model.sites]
        if describe != [(site.name, site.group, site.kv_heads, site.head_dim) for site in self.sites]:
            raise ValueError(
                f"the PrefixModel wraps a base model ({type(model.lm).__name__}, {len(model.sites)} attention "
                f"sites) that differs from the bank's ({type(self.lm).__name__}, {len(self.sites)}): a prefix "
                "only fits the base model it was trained for"
            )
        self._check_model_type(model.lm.config.model_type, "the PrefixModel")
        with torch.no_grad():
            key_values = model.prefix_key_values()
        return model.config, [torch.stack(key_values[site.name]) for site in self.sites]

    def _from_folder(self, folder: str | Path) -> tuple[PrefixConfig, list[torch.Tensor]]:
        exported = read_prefix(folder)
        exported.check_fits(self.lm, self.sites)
        config = exported.config
        if config.kind == "embedding":  # input embeddings: what the frozen LM makes of them in every layer
            # transformers types the embeddings as a plain Module.
            width: int = self.lm.get_input_embeddings().embedding_dim  # type: ignore[assignment]
            embeddings = exported.blocks({INPUT: [(config.length, width)]})[INPUT][0]
            parameter = next(self.lm.parameters())
            inputs_embeds = embeddings.to(parameter.device, parameter.dtype)[None]
            with torch.no_grad():
                return config, site_activations(self.lm, self.injector, self.sites, inputs_embeds=inputs_embeds)
        blocks = exported.blocks(site_token_shapes(self.sites, config.length))
        return config, [blocks[group][index] for group, index in site_keys(self.sites)]

    def _check_model_type(self, model_type: str | None, what: str) -> None:
        if model_type is not None and model_type != self.lm.config.model_type:
            raise ValueError(
                f"{what} was trained for a {model_type} model, but the bank's LM is a {self.lm.config.model_type} "
                "model: a prefix only fits the base model it was trained for"
            )

    @property
    def virtual_positions(self) -> int:
        """The most positions any held prefix takes in front of the real tokens (source budgets leave room)."""
        return max((self.held(name).config.virtual_positions for name in self.entries), default=0)

    # -- running ---------------------------------------------------------------------------------------------
    def forward(self, *, prefixes: PrefixNames, **inputs: Any) -> Any:
        """The LM's forward (loss, logits, ...), each row with the prefix named at its index (None: none)."""
        check_inputs(self.lm, inputs)
        self._route(prefixes, _rows_of(inputs), inputs)
        return self.lm(**inputs)

    def loss(
        self, labels: torch.Tensor, prefixes: PrefixNames, length_groups: int | None = None, **inputs: Any
    ) -> torch.Tensor:
        """Token-mean cross-entropy over the target tokens (see :func:`target_loss`), each row with its prefix.

        Length groups run subsets of the rows, each pointing the per-row prefixes at its own; with gradient
        checkpointing the layers are recomputed after every group has run, so the batch then runs as one group.
        """
        labeled = {**inputs, "labels": labels}
        check_inputs(self.lm, labeled)
        current = self._route(prefixes, labels.shape[0], labeled)
        if current is None or current.uniform:
            return target_loss(self.lm, labels, length_groups, **inputs)
        rows = current.rows

        def point_at(group: torch.Tensor) -> None:
            current.rows = rows[group.to(rows.device)]

        groups = length_groups if self._length_groups_allowed else 1
        return target_loss(self.lm, labels, groups, on_group=point_at, **inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *, prefixes: PrefixNames, **kwargs: Any) -> Any:
        """``PrefixModel.generate`` with each input's own prefix (beams and returned sequences follow their
        input); a decoder-only beam search holds each input's prefix in its cache after the prompt."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        check_inputs(self.lm, kwargs)
        current = self._route(prefixes, _rows_of(kwargs), kwargs, tokens_to_generate(self.lm, kwargs))
        return generate(self.lm, kwargs, self.packed_weights, self._cached_prefix(current))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the frozen LM's layers in backward (see :func:`checkpoint_layers`)."""
        checkpoint_layers(self.lm)
        self._length_groups_allowed = False

    def _route(
        self, prefixes: PrefixNames, rows: int, inputs: dict[str, Any], generated: int = 0
    ) -> RowPrefixes | None:
        """Point every site at this call's prefixes (kept until the next call, so that recomputed layers read
        the same ones), and refuse ``inputs`` that would not fit the LM's positions behind them (``generated``: the
        tokens generate adds); None when no row has a prefix."""
        names = self._checked(prefixes, rows)
        used = sorted({name for name in names if name is not None})
        self.injector.current, most_shift = None, 0
        if used:
            entries = [self.held(name) for name in used]
            blocks: list[list[torch.Tensor] | None] = [entry.site_blocks() for entry in entries]
            shifts = [entry.config.virtual_positions for entry in entries]
            if None in names:  # the rows without a prefix: an entry that shows nothing
                blocks.append(None)
                shifts.append(0)
            place = {name: index for index, name in enumerate(used)}
            per_row = [place[name] if name is not None else len(used) for name in names]
            self.injector.current, most_shift = RowPrefixes.build(blocks, shifts, per_row), max(shifts)
        check_positions(self.lm, self.injector, inputs, most_shift, generated)
        return self.injector.current

    def _checked(self, prefixes: PrefixNames, rows: int) -> list[str | None]:
        if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence):
            raise TypeError(f"prefixes must be a list with one prefix name (or None) per row, got {prefixes!r}")
        if len(prefixes) != rows:
            raise ValueError(f"prefixes has {len(prefixes)} names, but the batch has {rows} rows: give one per row")
        names = list(prefixes)
        self._known([name for name in names if name is not None])
        return names

    def _known(self, names: Sequence[str]) -> None:
        unknown = sorted({name for name in names if name not in self.entries}, key=str)
        if unknown:
            held = ", ".join(self.entries) or "none"
            raise ValueError(f"unknown prefix {', '.join(map(repr, unknown))}; the bank holds: {held}")

    def _cached_prefix(self, current: RowPrefixes | None) -> CachedPrefix | None:
        """Each input's prefix as cache entries for the beam search's steps after the prompt (see
        ``PrefixModel._cached_prefix``)."""
        layers = cache_layers(self.lm, self.sites)
        if current is None or layers is None:
            return None
        if current.uniform:
            entry = current.rows[0]
            blocks = {layer: table[entry] for layer, table in zip(layers, current.tables, strict=True)}
            return CachedPrefix(blocks, int(current.shifts[entry]), self.injector.disabled)
        rows = current.rows
        blocks = {layer: table[rows] for layer, table in zip(layers, current.tables, strict=True)}
        return CachedPrefix(
            blocks,
            current.shifts[rows],
            self.injector.disabled,
            columns=current.columns[rows],
            follow_rows=current.select,
        )


def _rows_of(inputs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise ValueError("give input_ids (or inputs_embeds): the prefixes are matched to their rows")
