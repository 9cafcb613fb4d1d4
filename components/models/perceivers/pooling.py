"""Pooling perceivers: 3D pooling of the token grid followed by a projection.

``avg_pool`` / ``max_pool`` are E3D-GPT's pooling ablations (pool + linear);
``spatial_pool_mlp`` is M3D-LaMed's projector (avg-pool k = 2, then a 2-layer GELU MLP;
8 x 16 x 16 = 2048 ViT tokens -> 4 x 8 x 8 = 256).
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from .base import Grid, Perceiver, check_divisible, tokens_to_volume, volume_to_tokens
from .mlp import mlp


class Pool3dPerceiver(Perceiver):
    """k x k x k average or max pooling with stride k, then an MLP of ``depth`` linear layers."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2,
                 mode: Literal["avg", "max"] = "avg", depth: int = 1):
        super().__init__(in_dim, out_dim, in_grid)
        if mode not in ("avg", "max"):
            raise ValueError(f"pool mode must be 'avg' or 'max', got {mode!r}")
        self.k, self.mode = k, mode
        check_divisible(self.in_grid, k, f"{mode}_pool")
        self.proj = mlp(in_dim, out_dim, depth)

    def out_grid(self, grid: Grid | None = None) -> Grid:
        return check_divisible(grid or self.in_grid, self.k, f"{self.mode}_pool")

    def forward(self, enc):
        x = tokens_to_volume(enc.tokens, enc.grid)
        pool = F.avg_pool3d if self.mode == "avg" else F.max_pool3d
        x = pool(x, kernel_size=self.k, stride=self.k)
        return self.proj(volume_to_tokens(x))


class AvgPoolPerceiver(Pool3dPerceiver):
    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2):
        super().__init__(in_dim, out_dim, in_grid, k=k, mode="avg", depth=1)


class MaxPoolPerceiver(Pool3dPerceiver):
    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2):
        super().__init__(in_dim, out_dim, in_grid, k=k, mode="max", depth=1)


class SpatialPoolMLPPerceiver(Pool3dPerceiver):
    """M3D-LaMed: average-pool k = 2 then Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2):
        super().__init__(in_dim, out_dim, in_grid, k=k, mode="avg", depth=2)
