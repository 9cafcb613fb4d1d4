"""Image-text retrieval with a contrastive (SigLIP / CLIP) checkpoint, without Ray (Med3DVLM Table 1).

Pairs are one report per volume: each volume's first caption sample in sample order (the order of
``samples.parquet``); pair i is volume i with that sample's ``answer`` (the report contrastive training
reads). Both towers end in an L2 normalisation, so the embeddings' dot products are cosine similarities.

:class:`PairEmbedder` loads a checkpoint once and embeds the pairs of one volume shard at a time (the
unit ``ray_jobs.evaluate`` streams through Ray Data); :func:`evaluate_retrieval` runs it over a split in
this process; :func:`retrieval_result` turns the embeddings into the result dict.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from components.metrics.results import retrieval_task
from components.metrics.retrieval import TEST_SIZES, TOP_K, similarity_matrix

from .data import read_samples, read_volumes, volume_shards
from .predict import model_folder

__all__ = ["TEXT_FIELD", "read_pairs", "PairEmbedder", "ordered_embeddings", "retrieval_result",
           "write_embeddings", "evaluate_retrieval"]

TEXT_FIELD = "answer"
"""The caption sample field holding the report."""


def read_pairs(data_path: str, split: str = "test", storage: dict | None = None) -> list[dict]:
    """``[{"volume_id", "sample_id", "report"}, ...]``: each volume's first caption sample, in sample order."""
    pairs, seen = [], set()
    for sample in read_samples(data_path, split, ("caption",), storage=storage):
        if sample["volume_id"] not in seen:
            seen.add(sample["volume_id"])
            pairs.append({"volume_id": sample["volume_id"], "sample_id": sample["id"],
                          "report": str(sample[TEXT_FIELD])})
    return pairs


class PairEmbedder:
    """A contrastive model folder, checkpoint or run folder (local or s3://), loaded to embed volumes and reports."""

    def __init__(self, checkpoint: str, storage: dict | None = None, device: str = "cpu", batch_size: int = 8):
        from components.training.stages import CONTRASTIVE_SETTINGS, ContrastiveStage

        with model_folder(checkpoint, storage, marker=CONTRASTIVE_SETTINGS) as folder:
            stage, model = ContrastiveStage.from_export(folder)
        self.model = model.to(device).eval()
        self.tokenizer, self.max_text_tokens = stage.tokenizer, stage.max_len
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def volumes(self, arrays: np.ndarray) -> np.ndarray:
        """``(N, 1, D, H, W)`` volumes -> ``(N, embed_dim)`` float32 embeddings."""
        out = [self.model.encode_image(torch.as_tensor(np.asarray(arrays[i:i + self.batch_size], np.float32),
                                                       device=self.device))
               for i in range(0, len(arrays), self.batch_size)]
        return torch.cat(out).float().cpu().numpy()

    @torch.no_grad()
    def reports(self, texts: Sequence[str]) -> np.ndarray:
        """Reports -> ``(N, embed_dim)`` float32 embeddings (cut to the training length)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_text_tokens, return_tensors="pt")
            out.append(self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)))
        return torch.cat(out).float().cpu().numpy()

    def shard(self, data_path: str, shard: str, reports: Mapping[str, str], storage: dict | None = None) -> dict:
        """The pairs whose volume is in one shard file (a :func:`volume_shards` path):
        ``{"volume_id", "image_embedding", "text_embedding"}`` arrays, one row per pair."""
        volumes = read_volumes(data_path, reports, storage=storage, shards=[shard])
        ids = list(volumes)
        return {"volume_id": np.array(ids, dtype=object),
                "image_embedding": self.volumes(np.stack([volumes[i] for i in ids])),
                "text_embedding": self.reports([reports[i] for i in ids])}


def ordered_embeddings(pairs: Sequence[Mapping], shard_outputs: Iterable[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """``(image, text)`` embeddings in pair order from :meth:`PairEmbedder.shard` outputs in any order."""
    by_volume = {}
    for out in shard_outputs:
        for vid, image, text in zip(out["volume_id"], out["image_embedding"], out["text_embedding"]):
            by_volume[vid] = (image, text)
    missing = [p["volume_id"] for p in pairs if p["volume_id"] not in by_volume]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(pairs)} report volumes were not embedded, e.g. {missing[:3]}")
    images, texts = zip(*(by_volume[p["volume_id"]] for p in pairs))
    return np.stack(images), np.stack(texts)


def retrieval_result(checkpoint: str, image_embeddings: np.ndarray, text_embeddings: np.ndarray, dataset: str,
                     split: str = "test", sizes: Sequence[int] = TEST_SIZES, ks: Sequence[int] = TOP_K) -> dict:
    """The retrieval task result (R@K both ways per size), with what produced the embeddings."""
    return retrieval_task(dataset, similarity_matrix(image_embeddings, text_embeddings), sizes, ks, split, settings={
        "checkpoint": checkpoint, "n_pairs": len(image_embeddings), "images": "real",
        "text_field": f"{TEXT_FIELD} of each volume's first caption sample, in sample order",
        "normalization": "L2 in both towers; similarity = dot product (cosine)"})


def write_embeddings(path: str, pairs: Sequence[Mapping], image_embeddings: np.ndarray,
                     text_embeddings: np.ndarray) -> str:
    """The pairs and their embeddings as Parquet (what the recalls were computed from)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"volume_id": [p["volume_id"] for p in pairs], "sample_id": [p["sample_id"] for p in pairs],
                      "report": [p["report"] for p in pairs],
                      "image_embedding": [row.tolist() for row in image_embeddings],
                      "text_embedding": [row.tolist() for row in text_embeddings]})
    pq.write_table(table, path)
    return path


ShardEmbedder = Callable[[Sequence[str], Mapping[str, str]], Iterable[Mapping]]
"""``(shard paths, {volume id: report})`` -> :meth:`PairEmbedder.shard` outputs, in any order."""


def evaluate_retrieval(checkpoint: str, data_path: str, split: str = "test", sizes: Sequence[int] = TEST_SIZES,
                       ks: Sequence[int] = TOP_K, batch_size: int = 8, dataset: str | None = None,
                       storage: dict | None = None, device: str = "cpu",
                       embed_shards: ShardEmbedder | None = None) -> dict:
    """Embed a split's pairs with a contrastive checkpoint and compute the recalls; returns
    ``{"result", "pairs", "image_embeddings", "text_embeddings"}``.

    ``embed_shards`` does the embedding; the default is one :class:`PairEmbedder` in this process
    (``ray_jobs.evaluate`` passes a Ray Data stream instead).
    """
    pairs = read_pairs(data_path, split, storage)
    if not pairs:
        raise ValueError(f"{data_path}: no caption samples in split {split!r} to pair volumes with reports")
    reports = {p["volume_id"]: p["report"] for p in pairs}
    if embed_shards is None:
        def embed_shards(shards, reports):
            embedder = PairEmbedder(checkpoint, storage, device, batch_size)
            return (embedder.shard(data_path, shard, reports, storage) for shard in shards)
    images, texts = ordered_embeddings(pairs, embed_shards(volume_shards(data_path, reports, storage), reports))
    result = retrieval_result(checkpoint, images, texts, dataset or os.path.basename(os.path.normpath(data_path)),
                              split, sizes, ks)
    return {"result": result, "pairs": pairs, "image_embeddings": images, "text_embeddings": texts}
