"""The trainable part: one group's prefix P, directly or through the MLP reparametrization P = MLP(P')."""

from __future__ import annotations

import math

import torch
from torch import nn

from prefix_lightning.prefix.config import PrefixConfig


class PrefixEncoder(nn.Module):
    """Produces one trainable block with the virtual-token axis L second to last: a group of attention sites'
    keys/values, ``token_shape`` (n_sites, 2, kv_heads, head_dim) -> (n_sites, 2, kv_heads, L, head_dim), or
    input embeddings, (d_model,) -> (L, d_model).

    The flat layout (L, prod(token_shape)) is the paper's: one row per virtual token, so the MLP maps each row of
    P' (L x d) to everything that token holds (all layers' keys and values).
    """

    def __init__(self, config: PrefixConfig, token_shape: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.shape = (config.length, *token_shape)
        width = math.prod(token_shape)
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

    def forward(self) -> torch.Tensor:
        return self.flat().view(self.shape).movedim(0, -2)

    def to_flat(self, prefix: torch.Tensor) -> torch.Tensor:
        """Inverse of the layout in :meth:`forward`: (..., L, last) -> (L, width)."""
        return prefix.movedim(-2, 0).reshape(self.shape[0], -1)

    @torch.no_grad()
    def assign(self, prefix: torch.Tensor) -> None:
        """Set a direct prefix to given values (export loading, real-word init)."""
        if self.mlp is not None:
            raise TypeError("assign() sets a direct prefix; fit() sets the MLP reparametrization")
        self.prefix.copy_(self.to_flat(prefix))

    @torch.enable_grad()
    def fit(self, prefix: torch.Tensor, start: torch.Tensor, steps: int = 2000, tolerance: float = 1e-3) -> float:
        """Train P' (from ``start``) and the MLP so that MLP(P') reproduces ``prefix``; return the relative error.

        This is how the paper's code initializes a reparametrized prefix from real words: the MLP cannot be
        set in closed form, so it is regressed onto the target activations.
        """
        assert self.mlp is not None
        target = self.to_flat(prefix).detach()
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
