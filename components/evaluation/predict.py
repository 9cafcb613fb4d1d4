"""Batched generation for evaluation: sample records + volumes -> prediction text (+ TG-IS slice scores)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from components.data.prompts import format_sample
from components.metrics.results import GenerationSettings

__all__ = ["model_folder", "load_model", "generation_kwargs", "predict", "model_info"]

# Serving merges the LoRA adapter into the LLM weights: same outputs, no adapter overhead per token.
SERVING_OVERRIDES = ("tune.llm=frozen",)


@contextlib.contextmanager
def model_folder(path: str | os.PathLike, storage: dict | None = None, marker: str = "config.yaml") -> Iterator[str]:
    """A local model folder from a model folder (holding ``marker``), a checkpoint (with ``model/``) or a
    run folder (its newest ``checkpoint_*``), local or s3:// (a remote one is downloaded to a temporary
    folder that is removed on exit: load the model inside the ``with`` block)."""
    from components.data.storage import exists, is_remote, join
    from components.training.loop import local_checkpoint

    path = str(path)
    if exists(join(path, marker), storage):
        if not is_remote(path):
            yield path
            return
        # local_checkpoint downloads a checkpoint's model/ part; a bare model folder is its parent's
        parent, name = path.rstrip("/").rsplit("/", 1)
        if name != "model":
            raise ValueError(f"{path}: a remote model folder must be a checkpoint's model/ folder")
        path = parent
    with local_checkpoint(path, storage) as local:
        yield os.path.join(local, "model")


def load_model(path: str | os.PathLike, storage: dict | None = None, device: str = "cpu"):
    """A ``VolumeVLM`` in eval mode from a model directory, a checkpoint (with ``model/``) or a run
    folder (its newest ``checkpoint_*``), local or s3://."""
    from components.models.vlm import VolumeVLM

    with model_folder(path, storage) as folder:
        return _ready(VolumeVLM.from_pretrained(folder, list(SERVING_OVERRIDES)), device)


def _ready(model, device: str):
    return model.to(device).eval()


def model_info(model, source: str | None = None) -> dict:
    """What the results JSON records about the model."""
    cfg = model.config
    parts = {"encoder_3d": cfg.encoder_3d.name, "perceiver": cfg.perceiver.name,
             "encoder_2d": cfg.encoder_2d.name if cfg.encoder_2d is not None else None,
             "fusion": cfg.fusion.name if model.fusion is not None else None}
    return {"source": source, "llm": cfg.llm.path or cfg.llm.source, "image_tokens": model.num_image_tokens, **parts}


def generation_kwargs(settings: GenerationSettings) -> dict:
    """``generate`` keyword arguments for the settings; sampling knobs only when sampling."""
    kwargs = dict(do_sample=settings.do_sample, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                  repetition_penalty=settings.repetition_penalty)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


def _volume_for(volumes, sample: Mapping, index: int) -> np.ndarray:
    return volumes[sample["volume_id"]] if isinstance(volumes, Mapping) else volumes[index]


@torch.no_grad()
def predict(model, volumes: Mapping[str, np.ndarray] | Sequence[np.ndarray], samples: Sequence[Mapping],
            settings: GenerationSettings | None = None, batch_size: int = 8) -> list[dict]:
    """``[{"prediction": text, "slice_scores": [floats] or None, "truncated": bool}, ...]``, one per sample,
    in order; ``truncated`` marks a prediction that ``max_new_tokens`` cut off.

    ``volumes`` maps volume id -> ``(1, D, H, W)`` array, or is a sequence aligned with ``samples``.
    Questions are formatted by :func:`format_sample` exactly as training formats them (fixed caption
    instruction); the answer part is dropped.
    """
    settings = settings or GenerationSettings()
    kwargs = generation_kwargs(settings)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    out: list[dict] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        questions = [format_sample(dict(s))[0] for s in chunk]
        batch = np.stack([np.asarray(_volume_for(volumes, s, start + k), dtype=np.float32)
                          for k, s in enumerate(chunk)])
        answers = model.answer_details(torch.from_numpy(batch).to(device), questions, **kwargs)
        scores = answers.slice_scores
        for k, text in enumerate(answers.texts):
            out.append({"prediction": text, "truncated": answers.truncated[k],
                        "slice_scores": scores[k].float().cpu().tolist() if scores is not None else None})
    return out
