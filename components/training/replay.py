"""A worker's shard kept in memory after one full pass and replayed, reshuffled, in later epochs.

Ray Data runs its pipeline again for every epoch: it lists the files, launches read tasks and starts
the sample-join actor before the first batch arrives. That takes several seconds on a small machine.
When an epoch itself lasts only seconds (small data sets, smoke runs, the quickstart), the restart
costs more than the training. If a worker's whole shard fits its memory budget, it is enough to read
it once. Later epochs come from memory, in an order fixed by (seed, epoch).

Whether to replay is decided once for all workers (see ``ray_jobs.train_common``). Under Ray Data
every worker must start an epoch together, so one worker cannot stream while another replays.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


class EpochReplay:
    """Streams the first epoch from ``stream()`` while keeping its rows; replays them afterwards."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rows: dict[str, np.ndarray] | None = None

    def batches(self, epoch: int, batch_size: int, stream: Callable[[], Iterator[dict]]) -> Iterator[dict]:
        if self.rows is None:
            yield from self._first_pass(stream())
            return
        n = len(next(iter(self.rows.values())))
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):  # full batches only, as the stream gives
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in self.rows.items()}

    def _first_pass(self, batches: Iterator[dict]) -> Iterator[dict]:
        kept = []
        for batch in batches:
            kept.append(batch)
            yield batch
        # Reached only when the consumer drained the shard. A run that stops mid-epoch keeps
        # nothing, and its next epoch streams again.
        if kept:
            self.rows = {k: _concat([b[k] for b in kept]) for k in kept[0]}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].dtype != object:
        return np.concatenate(parts)
    # object columns hold one Python value per row (e.g. a list of choices), which numpy may have
    # laid out as a 2-D array in one batch and a 1-D one in the next: keep them one per row
    out = np.empty(sum(len(p) for p in parts), dtype=object)
    for i, value in enumerate(v for p in parts for v in p):
        out[i] = value
    return out
