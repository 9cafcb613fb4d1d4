"""The output contract every 3D encoder honours, so perceivers can rebuild the 3D grid."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncoderOutput:
    """What a 3D encoder returns for a batch of volumes."""

    tokens: torch.Tensor
    """(B, N, C) final tokens, N = prod(grid)."""
    grid: tuple[int, int, int]
    """(d, h, w) token grid, row-major (d slowest)."""
    stages: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)
    """Multi-scale (tokens (B, N_i, C_i), grid_i), coarsest last; for a ViT just [(tokens, grid)]."""


def to_tokens(feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, d, h, w) -> ((B, d*h*w, C), (d, h, w)), row-major with d slowest."""
    b, c, d, h, w = feature_map.shape
    return feature_map.flatten(2).transpose(1, 2), (d, h, w)


def to_feature_map(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``to_tokens``: (B, N, C) with N = prod(grid) -> (B, C, d, h, w)."""
    b, n, c = tokens.shape
    d, h, w = grid
    if n != d * h * w:
        raise ValueError(f"{n} tokens do not fill a {d}x{h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, c, d, h, w)
