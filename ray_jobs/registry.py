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
    if "preprocess" in parts:
        from ray_jobs.preprocess import PreprocessConfig
        return PreprocessConfig
    raise KeyError(f"no config class registered for {path}")
