"""Training batches read straight from the preprocessed shards (what a one-worker sweep trial streams)."""
import os

import numpy as np
import pytest

from components.evaluation.data import read_volumes
from components.training.shards import ShardBatches


def _samples(shards, split, tasks):
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(shards, "samples.parquet")).to_pylist()
    return [r for r in rows if r["split"] == split and r["task"] in tasks]


def test_samples_join_their_volumes_and_every_row_comes_once_per_epoch(train_shards):
    tasks = ("caption", "vqa_closed")
    want = _samples(train_shards, "train", tasks)
    rows = ShardBatches(train_shards, "train", tasks)
    assert rows.rows == len(want)
    batches = list(rows(1, seed=3, shuffle_buffer=16))
    got = [(b["volume_id"][0], b["question"][0]) for b in batches]
    assert sorted(got) == sorted((s["volume_id"], s["question"]) for s in want)
    assert got != [(b["volume_id"][0], b["question"][0]) for b in rows(1, seed=4, shuffle_buffer=16)]
    volumes = read_volumes(train_shards, split="train")
    for b in batches[:5]:
        assert b["volume"].shape == (1, 1, 32, 64, 64) and b["volume"].dtype == np.float32
        assert np.array_equal(b["volume"][0], volumes[b["volume_id"][0]])
    closed = next(b for b in batches if b["task"][0] == "vqa_closed")
    assert isinstance(closed["choices"][0], list) and closed["answer_choice"][0] in "ABCD"
    # full batches only, the columns the Ray session yields
    full = list(rows(4))
    assert len(full) == len(want) // 4 and all(len(b["task"]) == 4 for b in full)
    assert set(full[0]) == {"volume_id", "volume", "task", "question_type", "question", "answer", "answer_choice",
                            "choices"}


def test_volumes_only_and_limit(train_shards):
    volumes = ShardBatches(train_shards, "validation")
    batch = next(volumes(2))
    assert set(batch) == {"id", "volume"} and volumes.rows == len(read_volumes(train_shards, split="validation"))
    limited = ShardBatches(train_shards, "train", ("vqa_open",), limit=5)
    assert limited.rows == 5 and len(list(limited(1))) == 5
    with pytest.raises(ValueError, match="no rows"):
        ShardBatches(train_shards, "no-such-split", ("caption",))
