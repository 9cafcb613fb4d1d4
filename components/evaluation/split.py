"""One split evaluated in this process, without Ray: what Tune trials and small checks call."""
from __future__ import annotations

import os
from typing import Iterable

from components.metrics.bertscore import BertScoreSettings
from components.metrics.results import GenerationSettings
from components.metrics.text import TextMetricSettings

from .data import EVAL_TASKS, apply_images, image_sources, read_samples, read_volumes
from .predict import load_model, model_info, predict
from .score import score

__all__ = ["evaluate_split"]


def evaluate_split(model_or_dir, data_path: str, split: str = "test", tasks: Iterable[str] = EVAL_TASKS,
                   settings: GenerationSettings | None = None, limit: int | None = None, images: str = "real",
                   bertscore: BertScoreSettings = BertScoreSettings(), seed: int = 0, batch_size: int = 8,
                   run: str | None = None, dataset: str | None = None, storage: dict | None = None) -> dict:
    """Generate and score one split; returns ``{"result": results dict, "rows": per-sample rows}``.

    ``model_or_dir`` is a ``VolumeVLM`` or a model/checkpoint/run folder (see :func:`load_model`).
    ``images``: ``real`` | ``zeros`` | ``shuffled`` (see :mod:`components.evaluation.data`);
    ``seed`` fixes the shuffle. ``limit`` keeps the first N samples of each task.
    """
    samples = read_samples(data_path, split, tasks, limit, storage)
    if not samples:
        raise ValueError(f"{data_path}: no samples in split {split!r} for tasks {tuple(tasks)}")
    if isinstance(model_or_dir, (str, os.PathLike)):
        source, model, was_training = str(model_or_dir), load_model(str(model_or_dir), storage), False
    else:
        # a model in training (e.g. a Tune trial's) goes back to train mode afterwards
        source, model, was_training = None, model_or_dir, model_or_dir.training
        model.eval()
    volume_ids = [s["volume_id"] for s in samples]
    sources = image_sources(volume_ids, images, seed)
    shown = apply_images(read_volumes(data_path, volume_ids, storage=storage), images, seed)
    settings = settings or GenerationSettings()
    try:
        outputs = predict(model, shown, samples, settings, batch_size=batch_size)
    finally:
        model.train(was_training)
    records = [{**s, **o, "image_volume_id": sources[s["volume_id"]]} for s, o in zip(samples, outputs)]
    rows, result = score(records, dataset=dataset or os.path.basename(os.path.normpath(data_path)), split=split,
                         run=run or f"{os.path.basename(os.path.normpath(source or 'model'))}-{images}",
                         generation=settings, model={**model_info(model, source), "images": images, "image_seed": seed},
                         text_settings=TextMetricSettings(bertscore=bertscore))
    return {"result": result, "rows": rows}
