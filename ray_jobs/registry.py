"""Which config class a shipped recipe is, by its folder under ray_jobs/configs/."""
from __future__ import annotations

from pathlib import Path


def config_class_for(path: str | Path):
    path = Path(path)
    parts = path.parts
    if path.name == "quickstart.yaml" and path.parent.name == "configs":
        from ray_jobs.quickstart import QuickstartConfig
        return QuickstartConfig
    if "phantom" in parts:
        from ray_jobs.make_phantom import MakePhantomConfig
        return MakePhantomConfig
    if "evaluate" in parts:
        from ray_jobs.evaluate import EvaluateConfig
        return EvaluateConfig
    if "tokenizer" in parts:
        from ray_jobs.train_tokenizer import TokenizerJobConfig
        return TokenizerJobConfig
    if "preprocess" in parts:
        from ray_jobs.preprocess import PreprocessConfig
        return PreprocessConfig
    name = path.stem
    if name == "mae":
        from ray_jobs.pretrain_mae import MAEJobConfig
        return MAEJobConfig
    if name.startswith("siglip"):  # siglip_2d: the per-slice encoder
        from ray_jobs.pretrain_contrastive import ContrastiveJobConfig
        return ContrastiveJobConfig
    if name in ("align", "finetune"):
        from ray_jobs.train_vlm import VLMJobConfig
        return VLMJobConfig
    raise KeyError(f"no config class registered for {path}")
