"""The trainable part: one group's prefix P, directly or through the MLP reparametrization P = MLP(P')."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from prefix_lightning.prefix.config import PrefixConfig
from prefix_lightning.prefix.sites import AttentionSite

INPUT = "input"  # the encoder of embedding-only: input embeddings, not a site group


def prefix_encoders(config: PrefixConfig, sites: Sequence[AttentionSite], embed_dim: int) -> nn.ModuleDict:
    """What trains for one prefix on these attention sites: an encoder per site group, each site with its own
    shape (2, kv_heads, head_dim) per virtual token; for embedding-only one encoder of input embeddings."""
    if config.kind == "embedding":
        return nn.ModuleDict({INPUT: PrefixEncoder(config, [(embed_dim,)], embed_dim)})
    shapes = site_token_shapes(sites)
    return nn.ModuleDict({group: PrefixEncoder(config, shape, embed_dim) for group, shape in shapes.items()})


def typed_encoders(encoders: nn.ModuleDict) -> dict[str, PrefixEncoder]:
    """The encoders of ``prefix_encoders`` by group, typed (nn.ModuleDict types its values as plain Modules)."""
    return {group: cast(PrefixEncoder, encoder) for group, encoder in encoders.items()}


def site_token_shapes(sites: Sequence[AttentionSite], length: int | None = None) -> dict[str, list[tuple[int, ...]]]:
    """Per site group, each site's prefix shape: (2, kv_heads, head_dim) per virtual token, or with ``length`` the
    whole block, (2, kv_heads, length, head_dim)."""
    tokens = () if length is None else (length,)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for site in sites:
        shapes.setdefault(site.group, []).append((2, site.kv_heads, *tokens, site.head_dim))
    return shapes


class PrefixEncoder(nn.Module):
    """Produces one trainable block per slot of a group, with the virtual-token axis L second to last: each
    attention site's keys/values, token shape (2, kv_heads, head_dim) -> (2, kv_heads, L, head_dim), or input
    embeddings, (d_model,) -> (L, d_model).

    Each slot keeps its own shape (models whose layers differ in key/value heads or head size). The flat layout
    (L, width) is the paper's: one row per virtual token holding every slot's values one after the other, so the
    MLP maps each row of P' (L x d) to everything that token holds (all layers' keys and values), split per slot.
    """

    def __init__(self, config: PrefixConfig, token_shapes: Sequence[tuple[int, ...]], embed_dim: int) -> None:
        super().__init__()
        self.length = config.length
        self.token_shapes = [tuple(shape) for shape in token_shapes]
        self.widths = [math.prod(shape) for shape in self.token_shapes]
        width = sum(self.widths)
        self.mlp: nn.Sequential | None = None
        if config.reparam == "mlp":
            # P' starts like an embedding table and the MLP like any Linear stack, as in the paper's code.
            self.embedding = nn.Parameter(torch.randn(config.length, embed_dim))
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, config.hidden_dim), nn.Tanh(), nn.Linear(config.hidden_dim, width)
            )
        else:
            self.prefix = nn.Parameter(torch.randn(config.length, width))

    def flat(self) -> torch.Tensor:
        return self.mlp(self.embedding) if self.mlp is not None else self.prefix

    def forward(self, dropout: float = 0.0) -> list[torch.Tensor]:
        """Every slot's block; ``dropout`` applies to the whole prefix (training)."""
        flat = nn.functional.dropout(self.flat(), dropout) if dropout else self.flat()
        chunks = flat.split(self.widths, dim=1)
        return [
            chunk.view(self.length, *shape).movedim(0, -2)
            for chunk, shape in zip(chunks, self.token_shapes, strict=True)
        ]

    def block_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each block that :meth:`forward` returns."""
        return [(*shape[:-1], self.length, shape[-1]) for shape in self.token_shapes]

    def to_flat(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of the layout in :meth:`forward`: the slots' (..., L, last) blocks -> (L, width)."""
        return torch.cat([block.movedim(-2, 0).reshape(self.length, -1) for block in blocks], dim=1)

    @torch.no_grad()
    def assign(self, blocks: Sequence[torch.Tensor]) -> None:
        """Set a direct prefix to given values (export loading, real-word init)."""
        if self.mlp is not None:
            raise TypeError("assign() sets a direct prefix; fit() sets the MLP reparametrization")
        self.prefix.copy_(self.to_flat(blocks))

    @torch.enable_grad()
    def fit(
        self, blocks: Sequence[torch.Tensor], start: torch.Tensor, steps: int = 2000, tolerance: float = 1e-3
    ) -> float:
        """Train P' (from ``start``) and the MLP so that MLP(P') reproduces ``blocks``; return the relative error.

        The paper's code also regresses the MLP onto the target activations (the MLP cannot be set in closed
        form), but more loosely: its low-data runs train the MLP alone (P' stays at its random start) for 500 Adam
        steps at 1e-4 on the squared error. Here P' starts at the words' input embeddings and trains with the MLP
        until the relative error is below ``tolerance``, so training starts closer to the words' activations.
        """
        assert self.mlp is not None
        target = self.to_flat(blocks).detach()
        with torch.no_grad():
            self.embedding.copy_(start)
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scale = target.pow(2).mean()
        error = float("inf")
        for _ in range(steps):
            loss = (self.flat() - target).pow(2).mean() / scale
            error = loss.sqrt().item()
            if error < tolerance:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return error
