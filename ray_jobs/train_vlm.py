"""VolumeVLM tuning with Ray Train: stage ``align`` (perceiver only) or ``finetune`` (perceiver + LoRA).

    python -m ray_jobs.train_vlm --config ray_jobs/configs/e3d_gpt/align.yaml [key.sub=value ...]

The stage's tune policy is the recipe's ``model.tune`` section; ``run.init_from`` points a
finetune run at the align run's checkpoint. The model directory of the final checkpoint is
``<checkpoint>/model`` (``VolumeVLM.from_pretrained`` reads it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from components.config import parse_cli, to_dict
from components.models.config import VLMConfig
from components.training.config import TrainingSections
from components.training.stages import VLMStage
from ray_jobs.common import RayConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class VLMJobConfig(TrainingSections):
    """VLM tuning: the model (with its tune modes), the stage, and the shared sections."""

    model: VLMConfig | None = None
    """Encoder(s), perceiver, fusion, LLM and tune modes, inline; or use ``model_preset``."""
    model_preset: str | None = None
    """A model YAML (e.g. components/models/presets/e3d_gpt.yaml) used when ``model`` is not given."""
    model_overrides: list[str] = field(default_factory=list)
    """``key=value`` changes to the preset (e.g. ``tune.llm=frozen`` for alignment)."""
    stage: Literal["align", "finetune"] = "align"
    """``align``: perceiver only, encoder and LLM frozen; ``finetune``: perceiver + LoRA."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def __post_init__(self):
        if self.model is None and self.model_preset:
            from components.config import ConfigError, load

            path = self.model_preset
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(ROOT, path)
            try:
                self.model = load(VLMConfig, path, self.model_overrides)
            except ConfigError as e:
                raise ConfigError(f"model_preset: {e}") from None
        if self.model is None:
            raise ValueError("model: a VLM recipe needs a model section or a model_preset")
        if self.model.frozen_feature_cache_mb and self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3:
            raise ValueError("model.frozen_feature_cache_mb: ZeRO-3 partitions the frozen encoders, which must then "
                             "run on every rank at each step; set it to 0 or use zero_stage 2")
        tune = self.model.tune
        if self.stage == "align" and (tune.llm != "frozen" or tune.encoder_3d != "frozen"):
            raise ValueError("stage: 'align' trains the perceiver only; set model.tune.llm and "
                             "model.tune.encoder_3d to frozen")
        if self.stage == "finetune" and tune.llm != "lora" and tune.llm != "full":
            raise ValueError("stage: 'finetune' tunes the LLM; set model.tune.llm to lora (or full)")

    def make_stage(self):
        return VLMStage(self.model, self.stage, self.data.tasks, self.data.images, to_dict(self.storage))


def main(argv=None):
    from ray_jobs.train_common import fit

    cfg = parse_cli(VLMJobConfig, argv, description=__doc__.splitlines()[0])
    print(json.dumps(fit(cfg, "ray_jobs.train_vlm.VLMJobConfig"), indent=1, default=str))


if __name__ == "__main__":
    main()
