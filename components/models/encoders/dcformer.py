"""DCFormer (Med3DVLM's image encoder): hierarchical 3D stages built on decomposed 1-D convolutions.

A k x k x k depthwise convolution is replaced by three parallel depthwise convolutions of shape
k x 1 x 1, 1 x k x 1 and 1 x 1 x k, each batch-normalised and summed (Med3DVLM eqs. 1-4), so large
kernels stay affordable at 128x256x256.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from components.config import from_dict
from components.models.encoders.common import EncoderOutput, to_tokens

__all__ = ["DCFormerConfig", "DCFormer", "DecomposedConv3d", "DCFormerBlock", "PRESETS", "build_dcformer"]


@dataclass
class DCFormerConfig:
    """Stem + hierarchical stages of a DCFormer. Sizes are (D, H, W)."""

    volume_size: tuple[int, int, int] = (128, 256, 256)
    """Input volume (D, H, W)."""
    in_channels: int = 1
    """Channels of the input volume (1 for CT)."""
    blocks: list[int] = field(default_factory=lambda: [1, 2, 3, 6, 2])
    """Units per stage: entry 0 counts stem units (only the first one strides), the rest blocks per stage."""
    channels: list[int] = field(default_factory=lambda: [64, 96, 192, 384, 768])
    """Channels of the stem and of each stage."""
    kernels: list[int] = field(default_factory=lambda: [13, 11, 9, 7])
    """Decomposed depthwise kernel length k of each stage after the stem (odd)."""
    stem_kernel: int = 7
    """Kernel length of the stem's strided decomposed convolution."""
    stem_stride: int = 4
    """Downsampling of the stem; every later stage halves each axis (3-wide max-pool, stride 2)."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's channel MLP as a multiple of the stage width."""
    layer_scale_init: float = 1e-6
    """Initial per-channel scale of each block's residual branch (0 disables layer scale)."""

    def __post_init__(self):
        if not (len(self.blocks) == len(self.channels) == len(self.kernels) + 1):
            raise ValueError(f"need len(blocks) == len(channels) == len(kernels) + 1, got "
                             f"{len(self.blocks)}, {len(self.channels)}, {len(self.kernels)}")
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"every stage needs at least one block, got blocks={self.blocks}")
        if any(k % 2 == 0 for k in [*self.kernels, self.stem_kernel]):
            raise ValueError(f"kernel lengths must be odd (same padding), got {self.kernels} / {self.stem_kernel}")

    @property
    def stage_grids(self) -> list[tuple[int, int, int]]:
        """Token grid after the stem and after each stage."""
        grid = tuple((n - 1) // self.stem_stride + 1 for n in self.volume_size)
        grids = [grid]
        for _ in self.kernels:
            grid = tuple((n - 1) // 2 + 1 for n in grid)
            grids.append(grid)
        return grids


PRESETS: dict[str, DCFormerConfig] = {
    # Med3DVLM's DCFormer-small: 128x256x256 -> ... -> (4x8x8 = 256 x 384), (2x4x4 = 32 x 768).
    "dcformer_small": DCFormerConfig(),
    "dcformer_tiny": DCFormerConfig(blocks=[1, 2, 3, 3, 2]),
    "dcformer_base": DCFormerConfig(blocks=[1, 2, 6, 6, 2], channels=[64, 128, 256, 512, 1024]),
}


class DecomposedConv3d(nn.Module):
    """Sum of three batch-normalised 1-D convolutions along d, h and w.

    ``depthwise=True`` gives the per-channel form used inside the blocks; the stem uses the dense form.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, depthwise: bool = False):
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise decomposed convolution keeps the channel count")
        self.branches = nn.ModuleList()
        for axis in range(3):
            size = [1, 1, 1]
            size[axis] = kernel
            padding = [s // 2 for s in size]
            self.branches.append(nn.Sequential(
                # BatchNorm follows, so a convolution bias would be redundant.
                nn.Conv3d(in_channels, out_channels, tuple(size), stride=stride, padding=tuple(padding),
                          groups=in_channels if depthwise else 1, bias=False),
                nn.BatchNorm3d(out_channels),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches[0](x) + self.branches[1](x) + self.branches[2](x)


class DCFormerBlock(nn.Module):
    """x + scale * MLP(decomposed depthwise conv(x)): the decomposed convolution mixes space, the MLP channels."""

    def __init__(self, channels: int, kernel: int, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.spatial_mixer = DecomposedConv3d(channels, channels, kernel, depthwise=True)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.layer_scale = (nn.Parameter(torch.full((channels,), layer_scale_init))
                            if layer_scale_init > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.spatial_mixer(x).permute(0, 2, 3, 4, 1))
        if self.layer_scale is not None:
            y = y * self.layer_scale
        return x + y.permute(0, 4, 1, 2, 3)


def _stem_unit(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        DecomposedConv3d(in_channels, out_channels, kernel, stride=stride), nn.GELU(),
        DecomposedConv3d(out_channels, out_channels, 3), nn.GELU(),
        DecomposedConv3d(out_channels, out_channels, 3), nn.GELU(),
        DecomposedConv3d(out_channels, out_channels, 3), nn.GELU(),
    )


class DCFormer(nn.Module):
    """Stem (stride 4) then stages that halve the grid (max-pool + 1x1x1 projection) and stack DCFormer blocks."""

    def __init__(self, cfg: DCFormerConfig):
        super().__init__()
        self.config = cfg
        self.stage_grids: list[tuple[int, int, int]] = cfg.stage_grids
        self.grid: tuple[int, int, int] = self.stage_grids[-1]
        self.stage_dims: list[int] = list(cfg.channels)
        self.out_dim: int = cfg.channels[-1]

        c0 = cfg.channels[0]
        self.stem = nn.Sequential(
            _stem_unit(cfg.in_channels, c0, cfg.stem_kernel, cfg.stem_stride),
            *(_stem_unit(c0, c0, cfg.stem_kernel, 1) for _ in range(cfg.blocks[0] - 1)),
        )
        self.stages = nn.ModuleList()
        for i, kernel in enumerate(cfg.kernels, start=1):
            c_in, c_out = cfg.channels[i - 1], cfg.channels[i]
            self.stages.append(nn.Sequential(
                nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
                nn.Conv3d(c_in, c_out, kernel_size=1, bias=False),
                *(DCFormerBlock(c_out, kernel, cfg.mlp_ratio, cfg.layer_scale_init) for _ in range(cfg.blocks[i])),
            ))
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        x = self.stem(volume)
        stages = [to_tokens(x)]
        for stage in self.stages:
            x = stage(x)
            stages.append(to_tokens(x))
        tokens, grid = stages[-1]
        return EncoderOutput(tokens=tokens, grid=grid, stages=stages)


def build_dcformer(cfg: DCFormerConfig | str | dict) -> DCFormer:
    """A DCFormer from a config, a preset name, or a plain mapping of config fields."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise KeyError(f"unknown DCFormer preset {cfg!r} (known: {', '.join(PRESETS)})")
        cfg = copy.deepcopy(PRESETS[cfg])  # models keep their config; presets stay pristine
    elif isinstance(cfg, dict):
        cfg = from_dict(DCFormerConfig, cfg)
    return DCFormer(cfg)
