"""E3D-GPT's 3D convolution perceiver: To3D -> Conv3d(kernel = stride = k) -> ToSequence."""
from __future__ import annotations

from torch import nn

from .base import Grid, Perceiver, check_divisible, tokens_to_volume, volume_to_tokens


class Conv3dPerceiver(Perceiver):
    """Merges each k x k x k block of tokens and projects it to the LLM width in one conv.

    At E3D-GPT's setting (14 x 14 x 14 = 2744 ViT tokens, k = 2) it yields 7^3 = 343 tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2):
        super().__init__(in_dim, out_dim, in_grid)
        self.k = k
        check_divisible(self.in_grid, k, "conv3d")
        self.conv = nn.Conv3d(in_dim, out_dim, kernel_size=k, stride=k)

    def out_grid(self, grid: Grid | None = None) -> Grid:
        return check_divisible(grid or self.in_grid, self.k, "conv3d")

    def forward(self, enc):
        return volume_to_tokens(self.conv(tokens_to_volume(enc.tokens, enc.grid)))
