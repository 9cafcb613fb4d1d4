"""Evaluation without Ray: read a split, generate, score, build the results dict.

* :mod:`.data` — the split's samples and volumes from the preprocessed layout; image
  conditions ``real`` / ``zeros`` / ``shuffled``.
* :mod:`.predict` — model loading and batched generation (:func:`predict`), with TG-IS slice scores.
* :mod:`.score` — per-sample metric rows and the results dict (:func:`score`).
* :mod:`.split` — :func:`evaluate_split`, the three above in one call.
* :mod:`.upload` — an uploaded volume (NIfTI, zipped DICOM, .npy) checked and preprocessed.
* :mod:`.retrieval` — image-text retrieval R@K with a contrastive checkpoint (:func:`evaluate_retrieval`).

``ray_jobs.evaluate`` runs the same functions inside Ray Serve deployments.
"""
from .data import IMAGE_MODES, apply_images, image_sources, read_samples, read_spec, read_volumes
from .predict import generation_kwargs, load_model, predict
from .retrieval import evaluate_retrieval
from .score import score
from .split import evaluate_split

__all__ = ["IMAGE_MODES", "apply_images", "image_sources", "read_samples", "read_spec", "read_volumes",
           "generation_kwargs", "load_model", "predict", "score", "evaluate_split", "evaluate_retrieval"]
