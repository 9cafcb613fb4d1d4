"""Perceivers / projectors: encoder tokens on a 3D grid -> ``(B, M, llm_hidden)``; and TG-IS fusion."""
from .base import Perceiver, tokens_to_volume, volume_to_tokens
from .conv3d import Conv3dPerceiver
from .mixer import DualStreamMixerPerceiver, DualStreamMLPPerceiver, MixerLayer, MLPMixerPerceiver
from .mlp import LinearPerceiver, MLP2xPerceiver
from .pooling import AvgPoolPerceiver, MaxPoolPerceiver, SpatialPoolMLPPerceiver
from .qformer import GlobalQFormerPerceiver, LocalQFormerPerceiver
from .tgis import FusionOutput, TGISFusion, slices_from_3d

__all__ = [
    "Perceiver", "tokens_to_volume", "volume_to_tokens", "Conv3dPerceiver", "GlobalQFormerPerceiver",
    "LocalQFormerPerceiver", "MLPMixerPerceiver", "DualStreamMixerPerceiver", "DualStreamMLPPerceiver", "MixerLayer", "AvgPoolPerceiver",
    "MaxPoolPerceiver", "SpatialPoolMLPPerceiver", "LinearPerceiver", "MLP2xPerceiver", "TGISFusion",
    "FusionOutput", "slices_from_3d",
]
