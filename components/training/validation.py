"""The periodic validation pass: mean loss over the first ``data.val_batches`` batches of the
validation split, without gradients or augmentation, averaged over all workers.

The batches are read once per run and kept in the worker's memory: every read of the split starts
a new data stream (seconds under Ray Data, more than the pass itself on small models), and every
pass then scores exactly the same rows. Every rank runs the same number of forward passes (the
smallest count any rank has): under ZeRO-3 a forward gathers parameters collectively, so a rank with
one batch more would hang.
"""
from __future__ import annotations

import itertools
import random

import torch
import torch.distributed as dist


def _all_reduce(value: torch.Tensor, op: dist.ReduceOp) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return float(value.item())


def read_validation_batches(session, data_cfg) -> list[dict]:
    """This rank's validation batches, cut to the count every rank has (a collective: call on all ranks)."""
    batches = list(itertools.islice(session.val_batches(data_cfg.batch_size), data_cfg.val_batches))
    count = torch.tensor([len(batches)], dtype=torch.float64, device=session.device)
    n = int(_all_reduce(count, dist.ReduceOp.MIN))
    if n == 0:
        raise RuntimeError(f"no validation batches in split {data_cfg.val_split!r} on some worker "
                           f"(batch size {data_cfg.batch_size})")
    return batches[:n]


def validation_loss(session, stage, engine, batches: list[dict]) -> float:
    """Mean loss over ``batches`` (from :func:`read_validation_batches`) and ranks; the model is back in
    training mode afterwards."""
    n = len(batches)
    module = engine.module  # unwrapped: DDP would sync buffers in forward, which validation must not
    module.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for i, rows in enumerate(batches):
                # a fixed prompt order per batch index: every pass scores the same prompts
                inputs = stage.collate(rows, None, random.Random(i), session.device)
                with engine.autocast():
                    loss, _ = stage.forward(module, inputs)
                total += float(loss)
    finally:
        module.train()
    mean = torch.tensor([total / n], dtype=torch.float64, device=session.device)
    return _all_reduce(mean, dist.ReduceOp.SUM) / session.world_size
