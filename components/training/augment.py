"""Seeded MONAI augmentation for training volumes (channel-first arrays)."""
from __future__ import annotations

import numpy as np

from components.training.config import AugmentConfig


def volume_augmentation(cfg: AugmentConfig, seed: int):
    """A MONAI ``Compose`` that owns its random state, or None when augmentation is off.

    Intensity only: spatial flips and rotations would silently corrupt left/right and plane answers.
    """
    if not cfg.enabled:
        return None
    import monai.transforms as mt

    parts = []
    if cfg.scale_prob > 0:
        parts.append(mt.RandScaleIntensity(factors=0.1, prob=cfg.scale_prob))
    if cfg.shift_prob > 0:
        parts.append(mt.RandShiftIntensity(offsets=0.1, prob=cfg.shift_prob))
    if cfg.noise_prob > 0:
        parts.append(mt.RandGaussianNoise(prob=cfg.noise_prob, std=0.01))
    if not parts:
        return None
    chain = mt.Compose(parts)
    chain.set_random_state(seed=seed % (2**32))
    return chain


def augment_batch(chain, volumes: np.ndarray) -> np.ndarray:
    if chain is None:
        return volumes
    import torch

    return np.stack([np.asarray(chain(torch.as_tensor(v)), dtype=np.float32) for v in volumes])
