"""Reading an evaluation split from the preprocessed layout, and the image conditions of a run.

The layout is what ``ray_jobs.preprocess`` writes: ``<path>/volumes/*.parquet`` (``id``,
``split``, ``volume`` as a fixed-shape tensor column), ``<path>/samples.parquet`` and
``<path>/summary.json`` (carrying the preprocessing spec). Plain pyarrow reads it: the
tensor column arrives as a flat list column whose field metadata holds the shape (or as
Ray's tensor extension type when Ray is imported in the same process).

Image conditions (``images``) are how a model that ignores its input is caught:
``real`` shows each sample its own volume, ``zeros`` an all-zero volume of the same shape,
``shuffled`` another sample's volume (a fixed-seed permutation of the volumes).
"""
from __future__ import annotations

import json
import random
from typing import Iterable, Mapping, Sequence

import numpy as np

from components.data.storage import join, open_fs, pyarrow_fs

__all__ = ["IMAGE_MODES", "EVAL_TASKS", "read_samples", "volume_shards", "read_volumes", "read_spec", "tensor_column",
           "image_sources", "apply_images"]

IMAGE_MODES = ("real", "zeros", "shuffled")
EVAL_TASKS = ("caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis")


def read_samples(data_path: str, split: str = "test", tasks: Iterable[str] = EVAL_TASKS,
                 limit: int | None = None, storage: dict | None = None) -> list[dict]:
    """Sample records of one split and the given tasks, in file order; ``limit`` keeps the first N of
    each task (so a short run still covers every task)."""
    import pyarrow.parquet as pq

    tasks = tuple(tasks)
    fs, path = open_fs(join(data_path, "samples.parquet"), storage)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    kept: dict[str, int] = {}
    samples = []
    for row in rows:
        task = row["task"]
        if row["split"] == split and task in tasks and (limit is None or kept.get(task, 0) < limit):
            kept[task] = kept.get(task, 0) + 1
            samples.append(row)
    return samples


def tensor_column(column, field) -> np.ndarray:
    """A fixed-shape tensor column (Ray's tensor extension type or its flat storage) as ``(N, *shape)``."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        shape = json.loads(array.type.__arrow_ext_serialize__())
        array = array.storage
    else:
        shape = json.loads((field.metadata or {})[b"ARROW:extension:metadata"])
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), *shape)


def volume_shards(data_path: str, ids: Iterable[str] | None = None, storage: dict | None = None) -> list[str]:
    """Paths of the volume shard files (holding any of ``ids``), sorted, as :func:`pyarrow_fs` names them."""
    import pyarrow.dataset as pads

    pfs, path = pyarrow_fs(join(data_path, "volumes"), storage)
    dataset = pads.dataset(path, filesystem=pfs, format="parquet")
    wanted = None if ids is None else set(ids)
    return sorted(f.path for f in dataset.get_fragments()
                  if wanted is None or wanted & set(f.to_table(columns=["id"]).column("id").to_pylist()))


def read_volumes(data_path: str, ids: Iterable[str] | None = None, split: str | None = None,
                 storage: dict | None = None, shards: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{volume id: (1, D, H, W) array}`` of the wanted ids (and/or split) from the volume shards
    (all of them, or the given ``shards`` files)."""
    import pyarrow.dataset as pads

    pfs, path = pyarrow_fs(join(data_path, "volumes"), storage)
    dataset = pads.dataset(list(shards) if shards is not None else path, filesystem=pfs, format="parquet")
    condition = None
    if ids is not None:
        condition = pads.field("id").isin(sorted(set(ids)))
    if split is not None:
        by_split = pads.field("split") == split
        condition = by_split if condition is None else condition & by_split
    table = dataset.to_table(columns=["id", "volume"], filter=condition)
    volumes = tensor_column(table.column("volume"), table.schema.field("volume"))
    return dict(zip(table.column("id").to_pylist(), volumes))


def read_spec(data_path: str, storage: dict | None = None) -> dict:
    """The preprocessing spec the shards were written with (from ``summary.json``)."""
    fs, path = open_fs(join(data_path, "summary.json"), storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"{data_path}: no summary.json, so the preprocessing spec is unknown; "
                                f"pass the spec explicitly")
    with fs.open(path, "rb") as f:
        return json.load(f)["spec"]


def image_sources(volume_ids: Sequence[str], images: str = "real", seed: int = 0) -> dict[str, str]:
    """``{volume id: id of the volume actually shown}`` for an image condition.

    ``shuffled`` shifts a seeded permutation by one place, so with two or more volumes no
    sample is shown its own (a plain permutation may leave some in place, which would hide
    part of what the condition is meant to remove).
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    ids = sorted(set(volume_ids))
    if images != "shuffled":
        return {i: i for i in ids}
    order = list(ids)
    random.Random(seed).shuffle(order)
    return {v: order[(k + 1) % len(order)] for k, v in enumerate(order)}


def apply_images(volumes: Mapping[str, np.ndarray], images: str = "real", seed: int = 0) -> dict[str, np.ndarray]:
    """The volumes each sample is shown under the image condition, keyed by the sample's volume id."""
    sources = image_sources(list(volumes), images, seed)
    if images == "zeros":
        return {v: np.zeros_like(volumes[v]) for v in sources}
    return {v: volumes[src] for v, src in sources.items()}
