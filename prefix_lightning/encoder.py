"""The trainable part: one group's prefix P, directly or through the MLP reparametrization P = MLP(P')."""

from __future__ import annotations

import torch
from torch import nn

from prefix_lightning.config import PrefixConfig


class PrefixEncoder(nn.Module):
    """Produces the prefix of one group of attention sites, shape (n_sites, 2, kv_heads, L, head_dim).

    The flat layout (L, n_sites * 2 * kv_heads * head_dim) is the paper's: one row per virtual token, so the
    MLP maps each row of P' (L x d) to all layers' keys and values for that token.
    """

    def __init__(self, config: PrefixConfig, n_sites: int, kv_heads: int, head_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.shape = (config.length, n_sites, 2, kv_heads, head_dim)
        width = n_sites * 2 * kv_heads * head_dim
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
        return self.flat().view(self.shape).permute(1, 2, 3, 0, 4)

    def to_flat(self, prefix: torch.Tensor) -> torch.Tensor:
        """Inverse of the layout in :meth:`forward`: (n_sites, 2, kv_heads, L, head_dim) -> (L, width)."""
        return prefix.permute(3, 0, 1, 2, 4).reshape(self.shape[0], -1)

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
