"""MLP-Mixer perceivers.

A mixer layer (Med3DVLM eqs. 6-7) mixes tokens, then channels, each with a 2-layer GELU MLP
after a LayerNorm over channels:  U = W2 s(W1 Norm(X)^T),  Y = W4 s(W3 Norm(U^T)).
The token MLP may change the number of tokens and the channel MLP the width, which is how a
mixer stack compresses encoder tokens; when neither changes the layer is residual, as in the
original MLP-Mixer.

``mlp_mixer``: one mixer stack over the final encoder tokens (E3D-GPT's ablation).
``dual_stream_mixer``: Med3DVLM's low/high hybrid projector: one stack over the penultimate
encoder stage (spatially detailed, 256 x 384 for DCFormer-small at 128 x 256 x 256) and one over
the final stage (semantic, 32 x 768); their outputs are concatenated (128 + 128 = 256 tokens).
Widths grow towards the LLM width layer by layer (D/2, then D for two layers).
``dual_stream_mlp``: the same two streams with token-wise MLPs (Med3DVLM's ``2xMLP-H`` row).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Grid, Perceiver
from .mlp import mlp


class MixerLayer(nn.Module):
    """Token mixing ``n_in -> n_out`` then channel mixing ``d_in -> d_out``."""

    def __init__(self, n_in: int, n_out: int, d_in: int, d_out: int, mlp_depth: int = 2):
        super().__init__()
        self.residual = n_in == n_out and d_in == d_out
        self.token_norm = nn.LayerNorm(d_in)
        self.token_mlp = mlp(n_in, n_out, mlp_depth)
        self.channel_norm = nn.LayerNorm(d_in)
        self.channel_mlp = mlp(d_in, d_out, mlp_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_in, d_in) -> (B, n_out, d_out)
        u = self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        if self.residual:
            u = u + x
        y = self.channel_mlp(self.channel_norm(u))
        return y + u if self.residual else y


def mixer_stack(n_in: int, d_in: int, tokens: Sequence[int], widths: Sequence[int], mlp_depth: int = 2) -> nn.Sequential:
    layers, n, d = [], n_in, d_in
    for n_out, d_out in zip(tokens, widths, strict=True):
        layers.append(MixerLayer(n, n_out, d, d_out, mlp_depth))
        n, d = n_out, d_out
    return nn.Sequential(*layers)


class MLPMixerPerceiver(Perceiver):
    """A mixer stack over the final tokens: the first layer maps N x C -> M x D, the rest are residual."""

    def __init__(self, in_dim: int, out_dim: int, in_grid: Grid, out_tokens: int = 256, depth: int = 2,
                 mlp_depth: int = 2):
        super().__init__(in_dim, out_dim, in_grid)
        self.num_out = out_tokens
        n_in = self.in_grid[0] * self.in_grid[1] * self.in_grid[2]
        self.mixer = mixer_stack(n_in, in_dim, [out_tokens] * depth, [out_dim] * depth, mlp_depth)

    def out_tokens(self, grid: Grid | None = None) -> int:
        return self.num_out

    def forward(self, enc):
        return self.mixer(enc.tokens)


def _widths(out_dim: int, depth: int) -> list[int]:
    if out_dim % 2 ** (depth - 1):
        raise ValueError(f"dual_stream_mixer: LLM width {out_dim} is not divisible by 2**{depth - 1}")
    return [out_dim // 2 ** (depth - 1 - i) for i in range(depth)]


class _TwoStreams(Perceiver):
    """Low (detailed) and high (semantic) encoder stages, each through its own stream, concatenated.

    ``stages`` lists every encoder stage as ``(width, grid)``, coarsest last; ``low_stage`` and
    ``high_stage`` pick the two streams' inputs. Subclasses build ``self.low``, ``self.high`` and
    ``self.num_out``.
    """

    def __init__(self, name: str, out_dim: int, stages: Sequence[tuple[int, Grid]], low_stage: int, high_stage: int):
        if len(stages) < 2:
            raise ValueError(f"{name} needs an encoder with at least two stages")
        (low_dim, low_grid), (high_dim, high_grid) = stages[low_stage], stages[high_stage]
        super().__init__(high_dim, out_dim, high_grid)
        self.name, self.low_dim = name, low_dim
        self.low_stage, self.high_stage = low_stage, high_stage
        self.low_grid = tuple(low_grid)
        self.n_low = low_grid[0] * low_grid[1] * low_grid[2]
        self.n_high = high_grid[0] * high_grid[1] * high_grid[2]

    def out_tokens(self, grid: Grid | None = None) -> int:
        return self.num_out

    def forward(self, enc):
        if not enc.stages:
            raise ValueError(f"{self.name} needs the encoder's multi-scale stages (EncoderOutput.stages)")
        low, _ = enc.stages[self.low_stage]
        high, _ = enc.stages[self.high_stage]
        return torch.cat([self.low(low), self.high(high)], dim=1)


class DualStreamMixerPerceiver(_TwoStreams):
    """Med3DVLM's projector: low (penultimate stage) and high (final stage) mixer streams, concatenated."""

    def __init__(self, out_dim: int, stages: Sequence[tuple[int, Grid]],
                 low_tokens: Sequence[int] = (192, 128), high_tokens: Sequence[int] = (64, 128),
                 low_stage: int = -2, high_stage: int = -1, mlp_depth: int = 2):
        super().__init__("dual_stream_mixer", out_dim, stages, low_stage, high_stage)
        if len(low_tokens) != len(high_tokens):
            raise ValueError("dual_stream_mixer: low_tokens and high_tokens need the same number of layers")
        widths = _widths(out_dim, len(low_tokens))
        self.low = mixer_stack(self.n_low, self.low_dim, low_tokens, widths, mlp_depth)
        self.high = mixer_stack(self.n_high, self.in_dim, high_tokens, widths, mlp_depth)
        self.num_out = low_tokens[-1] + high_tokens[-1]


class DualStreamMLPPerceiver(_TwoStreams):
    """Med3DVLM's ``2xMLP-H`` ablation: the same two streams through token-wise MLPs instead of mixers,
    so every token of both stages reaches the LLM (256 + 32 for DCFormer-small)."""

    def __init__(self, out_dim: int, stages: Sequence[tuple[int, Grid]], low_stage: int = -2, high_stage: int = -1,
                 mlp_depth: int = 2):
        super().__init__("dual_stream_mlp", out_dim, stages, low_stage, high_stage)
        self.low = mlp(self.low_dim, out_dim, mlp_depth)
        self.high = mlp(self.in_dim, out_dim, mlp_depth)
        self.num_out = self.n_low + self.n_high
