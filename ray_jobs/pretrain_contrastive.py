"""Med3DVLM stage 0: SigLIP (or CLIP) contrastive pretraining of a 3D encoder against report text; with
``encoder.name: slice2d``, of Med-2E3's per-slice 2D encoder (attention-pooled over slices).

    python -m ray_jobs.pretrain_contrastive --config ray_jobs/configs/med3dvlm/siglip.yaml [key.sub=value ...]

The image-encoder export is ``<checkpoint>/model/encoder.safetensors``; a VLM recipe's
``model.encoder_3d.checkpoint`` (or ``model.encoder_2d.checkpoint`` for a per-slice encoder) may name
it, its checkpoint, or the run folder (the newest checkpoint's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from components.config import parse_cli, to_dict
from components.models.config import EncoderSpec
from components.models.pretraining.contrastive import ContrastiveConfig
from components.training.config import TrainingSections
from components.training.stages import ContrastiveStage
from ray_jobs.common import RayConfig


@dataclass
class ContrastiveJobConfig(TrainingSections):
    """Contrastive pretraining: image encoder, text tower and loss, plus the shared sections."""

    encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(name="dcformer", preset="dcformer_small"))
    """The image encoder to pretrain: a 3D encoder, or ``slice2d`` (Med-2E3's per-slice encoder, for
    which no pretrained medical weights may be at hand)."""
    model: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Text tower, shared width and loss."""
    max_text_tokens: int = 128
    """Reports are cut to this many tokens."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def make_stage(self):
        return ContrastiveStage(self.model, self.encoder, self.max_text_tokens, to_dict(self.storage))


def main(argv=None):
    from ray_jobs.train_common import fit

    cfg = parse_cli(ContrastiveJobConfig, argv, description=__doc__.splitlines()[0])
    print(json.dumps(fit(cfg, "ray_jobs.pretrain_contrastive.ContrastiveJobConfig"), indent=1, default=str))


if __name__ == "__main__":
    main()
