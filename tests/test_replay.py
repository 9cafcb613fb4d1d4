"""A worker's shard replayed from memory after its first epoch: same rows, new order per epoch."""
import numpy as np

from components.training.replay import EpochReplay


def _stream(calls, n=10, batch=3):
    """Batches as Ray Data gives them: full ones only; choices as lists whose lengths vary by row."""
    def gen():
        calls.append(1)
        for i in range(0, n - batch + 1, batch):
            ids = np.arange(i, i + batch)
            choices = np.empty(batch, dtype=object)
            choices[:] = [["a", "b"] if j % 2 else ["a", "b", "c"] for j in ids]
            yield {"id": ids, "volume": np.stack([np.full((2, 2), j, np.float32) for j in ids]),
                   "choices": choices}
    return gen


def test_first_epoch_streams_later_epochs_replay_its_rows_reshuffled():
    calls = []
    replay = EpochReplay(seed=7)
    first = list(replay.batches(0, 3, _stream(calls)))
    assert [b["id"].tolist() for b in first] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # streamed as is
    second = list(replay.batches(1, 3, _stream(calls)))
    third = list(replay.batches(2, 3, _stream(calls)))
    assert len(calls) == 1  # the pipeline ran once
    for epoch in (second, third):
        ids = np.concatenate([b["id"] for b in epoch])
        assert sorted(ids.tolist()) == list(range(9)) and all(len(b["id"]) == 3 for b in epoch)
        for b in epoch:  # rows stay whole: each volume and choice list travels with its id
            assert all((v == i).all() for v, i in zip(b["volume"], b["id"]))
            assert all(len(c) == (2 if i % 2 else 3) for c, i in zip(b["choices"], b["id"]))
    order = [np.concatenate([b["id"] for b in e]).tolist() for e in (first, second, third)]
    assert order[1] != order[0] and order[2] != order[1]
    # the order of an epoch is a function of (seed, epoch): a restarted worker replays the same
    again = EpochReplay(seed=7)
    list(again.batches(0, 3, _stream([])))
    assert np.concatenate([b["id"] for b in again.batches(1, 3, None)]).tolist() == order[1]


def test_an_epoch_left_before_its_end_keeps_nothing():
    calls = []
    replay = EpochReplay(seed=0)
    for _ in zip(range(2), replay.batches(0, 3, _stream(calls))):
        pass  # the consumer stops after two batches
    list(replay.batches(1, 3, _stream(calls)))
    assert len(calls) == 2 and replay.rows is not None  # streamed again, and kept this time
