"""Per-slice 2D encoder (Med-2E3's 2D branch): a SigLIP vision tower applied to every slice of a volume."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from components.config import from_dict

__all__ = ["Slice2DConfig", "Slice2DEncoder", "PRESETS", "build_slice2d"]


@dataclass
class Slice2DConfig:
    """Where the SigLIP vision tower comes from and how slices are fed to it."""

    model_path: str | None = None
    """Local directory of a SigLIP (vision) checkpoint; never fetched from the Hub."""
    vision_config: dict[str, Any] | None = None
    """``SiglipVisionConfig`` fields for a freshly initialised tower, used when ``model_path`` is null."""
    select_layer: int | None = None
    """Hidden-state index to return (e.g. -2, as LLaVA-style models do); null = the post-LayerNorm output."""
    slice_batch: int = 64
    """Slices per tower call; bounds peak memory for long volumes."""
    pixel_mean: float = 0.5
    """Subtracted from slices in [0, 1] after resizing (SigLIP's processor uses 0.5)."""
    pixel_std: float = 0.5
    """Slices are divided by this after the mean is subtracted (SigLIP's processor uses 0.5)."""

    def __post_init__(self):
        if self.model_path is None and self.vision_config is None:
            raise ValueError("set model_path (a local SigLIP checkpoint) or vision_config")
        if self.slice_batch < 1:
            raise ValueError(f"slice_batch must be >= 1, got {self.slice_batch}")


PRESETS: dict[str, Slice2DConfig] = {
    # The tower used by TinyLLaVA-based Med-2E3 (architecture only; set model_path to load its weights).
    "siglip_so400m_patch14_384": Slice2DConfig(vision_config=dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14)),
    "siglip_base_patch16_224": Slice2DConfig(vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16)),
    "tiny_siglip": Slice2DConfig(vision_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)),
}


class Slice2DEncoder(nn.Module):
    """(B, 1, N, H, W) volume -> (B, N, L, D) features, one SigLIP forward per slice."""

    per_slice = True
    """Its output keeps a slice axis (contrastive pretraining pools over it)."""

    def __init__(self, cfg: Slice2DConfig):
        super().__init__()
        # Deferred so that 3D-only models never import transformers' vision stack.
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.config = cfg
        # The attention-pooling head yields one vector per image; only the patch tokens are used.
        if cfg.model_path is not None:
            self.tower = SiglipVisionModel.from_pretrained(cfg.model_path, local_files_only=True,
                                                           vision_use_head=False)
        else:
            tower_cfg = SiglipVisionConfig(**{**cfg.vision_config, "vision_use_head": False})
            self.tower = SiglipVisionModel(tower_cfg)
        tower_cfg = self.tower.config
        self.image_size: int = tower_cfg.image_size
        self.out_dim: int = tower_cfg.hidden_size
        self.num_tokens: int = (tower_cfg.image_size // tower_cfg.patch_size) ** 2

    def encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """(S, 1 or 3, H, W) slices in [0, 1] -> (S, L, D)."""
        if slices.shape[-2:] != (self.image_size, self.image_size):
            slices = F.interpolate(slices, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        if slices.shape[1] == 1:
            slices = slices.expand(-1, 3, -1, -1)
        slices = (slices - self.config.pixel_mean) / self.config.pixel_std
        features = []
        for chunk in slices.split(self.config.slice_batch):
            if self.config.select_layer is None:
                features.append(self.tower(pixel_values=chunk).last_hidden_state)
            else:
                out = self.tower(pixel_values=chunk, output_hidden_states=True)
                features.append(out.hidden_states[self.config.select_layer])
        return torch.cat(features)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.dim() != 5:
            raise ValueError(f"expected a (B, C, N, H, W) volume, got {tuple(volume.shape)}")
        b, c, n, h, w = volume.shape
        slices = volume.transpose(1, 2).reshape(b * n, c, h, w)
        features = self.encode_slices(slices.to(self.tower.dtype))
        return features.reshape(b, n, *features.shape[1:])


def build_slice2d(cfg: Slice2DConfig | str | dict) -> Slice2DEncoder:
    """A Slice2DEncoder from a config, a preset name, or a plain mapping of config fields."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise KeyError(f"unknown slice encoder preset {cfg!r} (known: {', '.join(PRESETS)})")
        cfg = copy.deepcopy(PRESETS[cfg])  # models keep their config; presets stay pristine
    elif isinstance(cfg, dict):
        cfg = from_dict(Slice2DConfig, cfg)
    return Slice2DEncoder(cfg)
