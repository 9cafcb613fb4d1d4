"""Token-wise projectors (LLaVA style): every encoder token becomes one LLM token."""
from __future__ import annotations

from torch import nn

from .base import Grid, Perceiver


def mlp(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """``Linear`` followed by ``depth - 1`` (GELU, Linear) pairs, as in LLaVA's ``mlp{depth}x_gelu``."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class TokenMLPPerceiver(Perceiver):
    """Projects every token independently; the token grid is unchanged."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, depth: int = 2):
        super().__init__(in_dim, out_dim, in_grid)
        self.proj = mlp(in_dim, out_dim, depth)

    def out_grid(self, grid: Grid | None = None) -> Grid:
        return tuple(grid or self.in_grid)

    def forward(self, enc):
        return self.proj(enc.tokens)


class LinearPerceiver(TokenMLPPerceiver):
    """A single linear layer per token."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid):
        super().__init__(in_dim, out_dim, in_grid, depth=1)


class MLP2xPerceiver(TokenMLPPerceiver):
    """Linear -> GELU -> Linear per token (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid):
        super().__init__(in_dim, out_dim, in_grid, depth=2)
