"""Q-Former perceivers (E3D-GPT's transformer ablations).

``qformer_global``: M learnable queries cross-attend to all encoder tokens (RadFM / BLIP-2 style).
``qformer_local``: the grid is cut into k x k x k windows and a few learnable queries per window
attend only to that window's tokens (Cambrian-1's local aggregation), so each output token keeps
a location in the volume.
Each layer is a pre-norm transformer decoder layer: query self-attention, cross-attention, FFN.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Grid, Perceiver, check_divisible, tokens_to_volume


def _decoder(hidden: int, heads: int, depth: int) -> nn.TransformerDecoder:
    if hidden % heads:
        raise ValueError(f"qformer: hidden size {hidden} is not divisible by {heads} heads")
    layer = nn.TransformerDecoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(hidden))


class _QFormer(Perceiver):
    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, hidden: int | None, heads: int, depth: int):
        super().__init__(in_dim, out_dim, in_grid)
        hidden = hidden or in_dim
        self.hidden = hidden
        self.in_norm = nn.LayerNorm(in_dim)
        self.in_proj = nn.Linear(in_dim, hidden) if hidden != in_dim else nn.Identity()
        self.decoder = _decoder(hidden, heads, depth)
        self.out_proj = nn.Linear(hidden, out_dim)


class GlobalQFormerPerceiver(_QFormer):
    """``num_queries`` learnable queries attending to every encoder token."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, num_queries: int = 256,
                 hidden: int | None = None, heads: int = 8, depth: int = 2):
        super().__init__(in_dim, out_dim, in_grid, hidden, heads, depth)
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, self.hidden) * 0.02)

    def out_tokens(self, grid: Grid | None = None) -> int:
        return self.num_queries

    def forward(self, enc):
        memory = self.in_proj(self.in_norm(enc.tokens))
        q = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        return self.out_proj(self.decoder(q, memory))


class LocalQFormerPerceiver(_QFormer):
    """``queries_per_window`` queries per k x k x k window, attending to that window only.

    Queries are shared across windows and told apart by a learnable per-window embedding.
    With one query per window the output tokens form the window grid (e.g. 14^3 -> 7^3 at k = 2).
    """

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, k: int = 2, queries_per_window: int = 1,
                 hidden: int | None = None, heads: int = 8, depth: int = 2):
        super().__init__(in_dim, out_dim, in_grid, hidden, heads, depth)
        self.k, self.queries_per_window = k, queries_per_window
        windows = check_divisible(self.in_grid, k, "qformer_local")
        n_windows = windows[0] * windows[1] * windows[2]
        self.queries = nn.Parameter(torch.randn(queries_per_window, self.hidden) * 0.02)
        self.window_embed = nn.Parameter(torch.randn(n_windows, 1, self.hidden) * 0.02)

    def out_grid(self, grid: Grid | None = None) -> Grid | None:
        windows = check_divisible(grid or self.in_grid, self.k, "qformer_local")
        return windows if self.queries_per_window == 1 else None

    def out_tokens(self, grid: Grid | None = None) -> int:
        w = check_divisible(grid or self.in_grid, self.k, "qformer_local")
        return w[0] * w[1] * w[2] * self.queries_per_window

    def forward(self, enc):
        k = self.k
        x = tokens_to_volume(self.in_proj(self.in_norm(enc.tokens)), enc.grid)  # (B, H, d, h, w)
        b, c, d, h, w = x.shape
        n_windows = (d // k) * (h // k) * (w // k)
        if n_windows != self.window_embed.shape[0]:
            raise ValueError(f"qformer_local was built for grid {self.in_grid}, got {tuple(enc.grid)}")
        x = x.reshape(b, c, d // k, k, h // k, k, w // k, k).permute(0, 2, 4, 6, 3, 5, 7, 1)
        memory = x.reshape(b * n_windows, k ** 3, c)
        q = (self.queries.unsqueeze(0) + self.window_embed).repeat(b, 1, 1)  # (B * nW, q, H)
        out = self.decoder(q, memory).reshape(b, n_windows * self.queries_per_window, c)
        return self.out_proj(out)
