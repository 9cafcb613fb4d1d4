"""The perceiver interface: encoder tokens on a known 3D grid -> ``(B, M, llm_hidden)``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from components.models.encoders.common import EncoderOutput

Grid = tuple[int, int, int]


def tokens_to_volume(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(B, N, C)`` row-major tokens -> ``(B, C, d, h, w)`` feature volume."""
    b, n, c = tokens.shape
    d, h, w = grid
    if n != d * h * w:
        raise ValueError(f"{n} tokens do not fill a {d}x{h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, c, d, h, w)


def volume_to_tokens(volume: torch.Tensor) -> torch.Tensor:
    """``(B, C, d, h, w)`` -> ``(B, d*h*w, C)`` row-major (d slowest)."""
    return volume.flatten(2).transpose(1, 2)


def check_divisible(grid: Grid, k: int, what: str) -> Grid:
    if any(g % k for g in grid):
        raise ValueError(f"{what}: token grid {tuple(grid)} is not divisible by k={k}")
    return tuple(g // k for g in grid)


class Perceiver(nn.Module):
    """Base class of every perceiver / projector.

    ``in_dim`` is the encoder width, ``out_dim`` the LLM hidden size and ``in_grid`` the
    encoder's final token grid ``(d, h, w)``. Subclasses implement ``forward(enc)`` and
    ``out_grid(grid)`` (the grid of the output tokens, or ``None`` when the output tokens
    are not laid out on a grid, e.g. learnable queries).
    """

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid):
        super().__init__()
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.in_grid: Grid = tuple(int(g) for g in in_grid)

    def out_grid(self, grid: Grid | None = None) -> Grid | None:
        return None

    def out_tokens(self, grid: Grid | None = None) -> int:
        """Number of tokens M handed to the LLM for an input token grid (default: ``in_grid``)."""
        g = self.out_grid(grid)
        if g is None:
            raise NotImplementedError
        return g[0] * g[1] * g[2]

    @property
    def num_tokens(self) -> int:
        """M at the grid the perceiver was built for."""
        return self.out_tokens(self.in_grid)

    def forward(self, enc: "EncoderOutput") -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
