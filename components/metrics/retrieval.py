"""Image-text retrieval recall (Med3DVLM Table 1).

For a test size N, the first N test pairs are used and pair i's image matches text i.
R@K in one direction is the fraction of queries whose match ranks in the top K of the N
candidates; ranks count candidates scoring strictly higher than the match, so a tie is
resolved in the match's favour. ``image_to_text`` queries with images (rows of the
image-by-text similarity matrix; Med3DVLM's script prints this as "IR"),
``text_to_image`` with texts (its "TR").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["TEST_SIZES", "TOP_K", "similarity_matrix", "recall_at_k", "retrieval_recalls"]

TEST_SIZES = (100, 500, 1000, 2000)
TOP_K = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")


def similarity_matrix(image_embeddings, text_embeddings, normalize: bool = False) -> np.ndarray:
    """Image-by-text dot products (cosine similarities when ``normalize``)."""
    images = np.asarray(image_embeddings, dtype=np.float64)
    texts = np.asarray(text_embeddings, dtype=np.float64)
    if images.ndim != 2 or texts.ndim != 2 or images.shape != texts.shape:
        raise ValueError(f"need two (N, D) arrays of equal shape, got {images.shape} and {texts.shape}")
    if normalize:
        images = images / np.linalg.norm(images, axis=1, keepdims=True)
        texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    return images @ texts.T


def _match_ranks(similarity: np.ndarray) -> np.ndarray:
    """0-based rank of each row's diagonal entry among that row."""
    diagonal = np.diag(similarity)[:, None]
    return np.sum(similarity > diagonal, axis=1)


def recall_at_k(similarity, k: int) -> float:
    """Fraction of rows whose diagonal entry is in the row's top ``k``."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need a square similarity matrix, got {sim.shape}")
    return float(np.mean(_match_ranks(sim) < k))


def retrieval_recalls(similarity, sizes: Sequence[int] = TEST_SIZES, ks: Sequence[int] = TOP_K) -> dict:
    """``{"image_to_text": {"100": {"R@1": ..}, ..}, "text_to_image": {..}, "skipped_sizes": [..]}``.

    ``similarity`` is the image-by-text matrix over all test pairs; sizes larger than the
    number of pairs are listed in ``skipped_sizes``.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need a square similarity matrix, got {sim.shape}")
    total = sim.shape[0]
    result: dict = {direction: {} for direction in DIRECTIONS}
    result["skipped_sizes"] = [int(n) for n in sizes if n > total]
    for n in sizes:
        if n > total:
            continue
        block = sim[:n, :n]
        for direction, matrix in (("image_to_text", block), ("text_to_image", block.T)):
            ranks = _match_ranks(matrix)
            result[direction][str(n)] = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
    return result
