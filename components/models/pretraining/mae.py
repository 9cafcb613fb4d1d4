"""3D masked autoencoder (E3D-GPT's visual foundation pretraining, after He et al. 2022).

Most patch tokens are dropped at random, the ViT encodes only the visible ones, and a light
decoder -- fed the encoded tokens plus one shared learnable mask token per missing patch, with its
own positional embeddings -- reconstructs the voxels. Only masked patches count in the loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from components.config import from_dict
from components.models.encoders.vit3d import (ViT3D, ViT3DConfig, init_vit_weights, patchify,
                                              sincos_pos_embed_3d, transformer_layer)

__all__ = ["MAEConfig", "MAE3D", "build_mae", "random_masking", "masked_reconstruction_loss"]


@dataclass
class MAEConfig:
    """A 3D MAE: the ViT to pretrain and the reconstruction decoder."""

    encoder: ViT3DConfig = field(default_factory=ViT3DConfig)
    """The ViT whose weights become the foundation model (E3D-GPT: patch 8x16x16, width 1536)."""
    decoder_width: int = 512
    """Token width inside the decoder."""
    decoder_depth: int = 8
    """Transformer layers in the decoder."""
    decoder_heads: int = 16
    """Attention heads in the decoder."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder."""
    norm_pix_loss: bool = False
    """Normalise each target patch by its own mean and variance."""
    decoder_pos_embed: Literal["learnable", "sincos"] = "sincos"
    """The decoder's positional embeddings (its own, not the encoder's)."""

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width={self.decoder_width} is not divisible by "
                             f"decoder_heads={self.decoder_heads}")


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device=None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random split of token indices into visible and masked.

    Returns ``ids_keep`` (B, n_visible), ``mask`` (B, N; 1 = masked) and ``ids_restore`` (B, N),
    the permutation that puts [visible, masked] tokens back into grid order.
    """
    num_visible = int(num_tokens * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_tokens, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    mask = torch.ones(batch, num_tokens, device=noise.device)
    mask[:, :num_visible] = 0
    mask = mask.gather(1, ids_restore)
    return ids_keep, mask, ids_restore


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               norm_pix_loss: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over masked patches only.

    pred, target: (B, N, patch_dim); mask: (B, N) with 1 where the patch was hidden.
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


class MAE3D(nn.Module):
    """Masked autoencoder around a ViT3D; ``forward(volume) -> {loss, pred, mask}``."""

    def __init__(self, encoder_cfg: ViT3DConfig, decoder_width: int = 512, decoder_depth: int = 8,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = False, decoder_heads: int = 16,
                 decoder_pos_embed: Literal["learnable", "sincos"] = "sincos"):
        super().__init__()
        self.config = MAEConfig(encoder=encoder_cfg, decoder_width=decoder_width, decoder_depth=decoder_depth,
                                decoder_heads=decoder_heads, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
                                decoder_pos_embed=decoder_pos_embed)
        self.encoder = ViT3D(encoder_cfg)
        grid, num_tokens = self.encoder.grid, self.encoder.num_tokens

        self.decoder_embed = nn.Linear(encoder_cfg.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        if decoder_pos_embed == "learnable":
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, decoder_width))
        else:
            self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(decoder_width, grid)[None],
                                 persistent=False)
        self.decoder_blocks = nn.ModuleList(
            transformer_layer(decoder_width, decoder_heads, encoder_cfg.mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, encoder_cfg.patch_dim)

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_vit_weights(module)
        nn.init.normal_(self.mask_token, std=0.02)
        if isinstance(self.decoder_pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def forward_encoder(self, volume: torch.Tensor, noise: torch.Tensor | None = None):
        tokens = self.encoder.embed(volume)
        b, n, c = tokens.shape
        ids_keep, mask, ids_restore = random_masking(b, n, self.config.mask_ratio, tokens.device, noise)
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, c))
        return self.encoder.encode(visible), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n_visible, c = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - n_visible, c)], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, c))  # back to grid order
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, volume: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise`` (B, N) fixes the masking (lowest values stay visible); random when omitted."""
        latent, mask, ids_restore = self.forward_encoder(volume, noise)
        pred = self.forward_decoder(latent, ids_restore)
        target = patchify(volume, self.config.encoder.patch_size)
        loss = masked_reconstruction_loss(pred, target, mask, self.config.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}

    def export_encoder(self) -> ViT3D:
        """A standalone copy of the pretrained ViT: the visual foundation model for the VLM."""
        return copy.deepcopy(self.encoder)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, loadable into ``ViT3D(config.encoder)``."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}


def build_mae(cfg: MAEConfig | dict) -> MAE3D:
    """An MAE3D from a config or a plain mapping of config fields."""
    if isinstance(cfg, dict):
        cfg = from_dict(MAEConfig, cfg)
    return MAE3D(cfg.encoder, cfg.decoder_width, cfg.decoder_depth, cfg.mask_ratio, cfg.norm_pix_loss,
                 cfg.decoder_heads, cfg.decoder_pos_embed)
