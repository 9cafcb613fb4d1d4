"""3D Vision Transformer over non-overlapping volume patches (E3D-GPT's MAE backbone, M3D's ViT)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.config import from_dict
from components.models.encoders.common import EncoderOutput

__all__ = ["ViT3DConfig", "ViT3D", "PRESETS", "build_vit3d", "sincos_pos_embed_3d", "patchify", "unpatchify"]


@dataclass
class ViT3DConfig:
    """Geometry and size of a 3D ViT. Sizes are (D, H, W): depth (slices) first."""

    volume_size: tuple[int, int, int] = (112, 224, 224)
    """Input volume (D, H, W); every axis must be a multiple of the patch size."""
    patch_size: tuple[int, int, int] = (8, 16, 16)
    """Patch (pd, ph, pw); patches do not overlap."""
    in_channels: int = 1
    """Channels of the input volume (1 for CT)."""
    width: int = 1536
    """Token width C."""
    depth: int = 12
    """Number of transformer layers."""
    heads: int = 12
    """Attention heads; must divide ``width``."""
    mlp_ratio: float = 4.0
    """Hidden width of each MLP as a multiple of ``width``."""
    pos_embed: Literal["learnable", "sincos"] = "sincos"
    """Learnable positional embeddings, or fixed 3D sine-cosine ones."""
    dropout: float = 0.0
    """Dropout inside the transformer layers."""
    final_norm: bool = True
    """Apply a LayerNorm to the output tokens."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward to save memory (training only)."""

    def __post_init__(self):
        for axis, (size, patch) in enumerate(zip(self.volume_size, self.patch_size)):
            if patch <= 0 or size % patch:
                raise ValueError(f"volume_size[{axis}]={size} is not a multiple of patch_size[{axis}]={patch}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.volume_size, self.patch_size))

    @property
    def patch_dim(self) -> int:
        """Voxels per patch (times channels): the length of one flattened patch."""
        return self.in_channels * math.prod(self.patch_size)


PRESETS: dict[str, ViT3DConfig] = {
    # E3D-GPT: 224x224x112 (H x W x D) at 1.5x1.5x3 mm, patch 16x16x8, ViT-Base doubled to 1536 wide.
    "e3d_vit": ViT3DConfig(volume_size=(112, 224, 224), patch_size=(8, 16, 16), width=1536, depth=12, heads=12,
                           pos_embed="sincos"),
    # M3D-LaMed's ViT: 32x256x256, patch 4x16x16, ViT-Base.
    "m3d_vit": ViT3DConfig(volume_size=(32, 256, 256), patch_size=(4, 16, 16), width=768, depth=12, heads=12,
                           pos_embed="learnable"),
    # A few seconds per step on a laptop CPU; for smoke runs and tests.
    "tiny_vit": ViT3DConfig(volume_size=(32, 64, 64), patch_size=(8, 16, 16), width=96, depth=2, heads=4),
}


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed (N, dim) sine-cosine embedding of a (d, h, w) grid, row-major; an equal even share per axis.

    Widths not divisible by 6 leave the last few channels zero.
    """
    axis_dim = (dim // 6) * 2
    if axis_dim == 0:
        raise ValueError(f"width {dim} is too small for a 3D sine-cosine embedding (need >= 6)")
    coords = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    parts = [_sincos_1d(axis_dim, c.flatten()) for c in coords]
    emb = torch.cat(parts, dim=1)
    emb = nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


def patchify(volume: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, pd*ph*pw*C), patches in row-major grid order."""
    b, c, d, h, w = volume.shape
    pd, ph, pw = patch_size
    x = volume.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int],
               channels: int = 1) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, pd*ph*pw*C) -> (B, C, D, H, W)."""
    b = patches.shape[0]
    pd, ph, pw = patch_size
    gd, gh, gw = grid
    x = patches.reshape(b, gd, gh, gw, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


def transformer_layer(width: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> nn.TransformerEncoderLayer:
    """A pre-norm ViT block (attention runs through torch's scaled_dot_product_attention)."""
    return nn.TransformerEncoderLayer(
        d_model=width, nhead=heads, dim_feedforward=int(width * mlp_ratio), dropout=dropout,
        activation="gelu", batch_first=True, norm_first=True, layer_norm_eps=1e-6,
    )


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear layers, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)


class ViT3D(nn.Module):
    """Patch embedding + positional embedding + pre-norm transformer layers over a 3D token grid."""

    def __init__(self, cfg: ViT3DConfig):
        super().__init__()
        self.config = cfg
        self.grid: tuple[int, int, int] = cfg.grid
        self.out_dim: int = cfg.width
        self.stage_dims: list[int] = [cfg.width]
        self.num_tokens = math.prod(self.grid)

        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        if cfg.pos_embed == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.width))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_3d(cfg.width, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            transformer_layer(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6) if cfg.final_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        init_vit_weights(self)
        # The patch projection is a linear map of the flattened patch.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, N, width) patch tokens with positions added."""
        expected = tuple(self.config.volume_size)
        if tuple(volume.shape[2:]) != expected or volume.shape[1] != self.config.in_channels:
            raise ValueError(f"expected a (B, {self.config.in_channels}, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"volume, got {tuple(volume.shape)}")
        tokens = self.patch_embed(volume).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the transformer layers on any subset of embedded tokens (the MAE passes only visible ones)."""
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        tokens = self.encode(self.embed(volume))
        return EncoderOutput(tokens=tokens, grid=self.grid, stages=[(tokens, self.grid)])


def build_vit3d(cfg: ViT3DConfig | str | dict) -> ViT3D:
    """A ViT3D from a config, a preset name, or a plain mapping of config fields."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise KeyError(f"unknown ViT3D preset {cfg!r} (known: {', '.join(PRESETS)})")
        cfg = copy.deepcopy(PRESETS[cfg])  # models keep their config; presets stay pristine
    elif isinstance(cfg, dict):
        cfg = from_dict(ViT3DConfig, cfg)
    return ViT3D(cfg)
