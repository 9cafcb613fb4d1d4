"""Training batches read straight from the preprocessed shards, without Ray.

A run with one worker in one process (a sweep trial) streams the split's volume shards with
pyarrow, record batch by record batch, joins each volume to its samples and shuffles through a
local buffer: memory stays bounded by the buffer, as with Ray Data, but there is no pipeline to
start per epoch (several seconds each for a trial whose whole training takes seconds).
Batches have the columns ``ray_jobs.train_common.RaySession`` yields.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator

import numpy as np

from components.data.storage import join, pyarrow_fs
from components.evaluation.data import read_samples, tensor_column

SAMPLE_COLUMNS = ("task", "question_type", "question", "answer", "answer_choice", "choices")


class ShardBatches:
    """Rows of one split of ``<data_path>/volumes`` (volumes, or one row per volume x sample of ``tasks``)."""

    def __init__(self, data_path: str, split: str, tasks=None, storage: dict | None = None,
                 limit: int | None = None):
        import pyarrow.dataset as pads

        pfs, path = pyarrow_fs(join(data_path, "volumes"), storage)
        self.dataset = pads.dataset(path, filesystem=pfs, format="parquet")
        self.condition = pads.field("split") == split
        self.samples: dict[str, list[dict]] | None = None
        ids = self.dataset.to_table(columns=["id"], filter=self.condition).column("id").to_pylist()
        if tasks is None:
            rows = len(ids)
        else:
            self.samples = defaultdict(list)
            for rec in read_samples(data_path, split, tuple(tasks), storage=storage):
                self.samples[rec["volume_id"]].append(rec)
            rows = sum(len(self.samples.get(i, ())) for i in ids)
        self.limit = limit
        self.rows = rows if limit is None else min(rows, limit)
        if self.rows == 0:
            raise ValueError(f"no rows in {data_path} (split {split!r}, tasks {tasks}); run ray_jobs.preprocess first")

    def _rows(self) -> Iterator[dict]:
        emitted = 0
        for batch in self.dataset.to_batches(columns=["id", "volume"], filter=self.condition, batch_size=8):
            volumes = tensor_column(batch.column("volume"), batch.schema.field("volume"))
            for vid, volume in zip(batch.column("id").to_pylist(), volumes):
                recs = [{}] if self.samples is None else self.samples.get(vid, [])
                for rec in recs:
                    if self.limit is not None and emitted >= self.limit:
                        return
                    emitted += 1
                    row = {"id": vid, "volume": volume.astype(np.float32, copy=False)}
                    if self.samples is not None:
                        row = {"volume_id": vid, "volume": row["volume"],
                               **{c: rec[c] for c in SAMPLE_COLUMNS}}
                    yield row

    def __call__(self, batch_size: int, seed: int | None = None, shuffle_buffer: int = 0) -> Iterator[dict]:
        """Full batches (the last partial one is dropped); ``seed`` + ``shuffle_buffer`` shuffle locally."""
        rows = self._rows()
        if seed is not None and shuffle_buffer > 1:
            rows = _local_shuffle(rows, shuffle_buffer, random.Random(seed))
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == batch_size:
                yield _columns(chunk)
                chunk = []


def _local_shuffle(rows: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def _columns(chunk: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for key in chunk[0]:
        if key == "volume":
            out[key] = np.stack([r[key] for r in chunk])
        else:  # object arrays of one item per row (choices are lists of unequal length)
            column = np.empty(len(chunk), dtype=object)
            column[:] = [r[key] for r in chunk]
            out[key] = column
    return out
