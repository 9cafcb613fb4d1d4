"""E3D-GPT stage 0: 3D MAE pretraining of the ViT on preprocessed CT shards, with Ray Train.

    python -m ray_jobs.pretrain_mae --config ray_jobs/configs/e3d_gpt/mae.yaml [key.sub=value ...]

The encoder export is ``<checkpoint>/model/encoder.safetensors``: point a VLM recipe's
``model.encoder_3d.checkpoint`` at it, at its checkpoint, or at the run folder (the newest checkpoint's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from components.config import parse_cli
from components.models.pretraining.mae import MAEConfig
from components.training.config import TrainingSections
from components.training.stages import MAEStage
from ray_jobs.common import RayConfig


@dataclass
class MAEJobConfig(TrainingSections):
    """MAE pretraining: the model plus the shared training sections."""

    model: MAEConfig = field(default_factory=MAEConfig)
    """The ViT to pretrain and its decoder."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def make_stage(self):
        return MAEStage(self.model)


def main(argv=None):
    from ray_jobs.train_common import fit

    cfg = parse_cli(MAEJobConfig, argv, description=__doc__.splitlines()[0])
    print(json.dumps(fit(cfg, "ray_jobs.pretrain_mae.MAEJobConfig"), indent=1, default=str))


if __name__ == "__main__":
    main()
