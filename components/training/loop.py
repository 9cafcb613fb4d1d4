"""The training loop every stage runs, on each worker, top to bottom.

It is written against a small :class:`Session` (rank, batches, latest checkpoint, report) so the
same body runs inside Ray Train workers (``ray_jobs.train_common.RaySession``) and in one plain
process (:class:`LocalSession`, used by unit tests).

Resuming restores model, optimizer/DeepSpeed state, scheduler, step, epoch and the position
inside the epoch; every random choice after that is a function of (seed, rank, epoch, batch index),
so a resumed run continues rather than repeats.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from components.config import to_dict
from components.training.augment import volume_augmentation
from components.training.config import TrainingSections
from components.training.engine import build_engine, describe
from components.training.validation import read_validation_batches, validation_loss


class Session(Protocol):
    world_rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def batches(self, epoch: int, batch_size: int) -> Iterator[dict]: ...

    def val_batches(self, batch_size: int) -> Iterator[dict]:
        """Validation batches in a fixed order (only called when ``run.val_every_n_steps`` is set)."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None: ...


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    micro_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    samples: int = 0

    @classmethod
    def read(cls, directory: str) -> "TrainerState":
        with open(os.path.join(directory, "trainer_state.json"), encoding="utf-8") as f:
            return cls(**json.load(f))

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(self.__dict__, f)


def find_checkpoint(path: str, storage: dict | None = None, field: str | None = None):
    """``(filesystem, folder)`` of the checkpoint ``path`` names: ``path`` itself when it holds ``model/``,
    else the run folder's newest ``checkpoint_*``. ``field`` (the setting that named it) prefixes errors."""
    from components.data.storage import open_fs

    fs, root = open_fs(path, storage)
    if fs.exists(f"{root}/model"):
        return fs, root
    entries = fs.ls(root, detail=True) if fs.isdir(root) else []
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
    ckpts = sorted(n for n in names if n.startswith("checkpoint_"))  # Ray zero-pads the index: newest last
    if not ckpts:
        where = f"{field}: " if field else ""
        raise FileNotFoundError(f"{where}no checkpoint (model/ folder or checkpoint_*) in {path}")
    return fs, f"{root.rstrip('/')}/{ckpts[-1]}"


@contextlib.contextmanager
def local_checkpoint(path: str | None, storage: dict | None = None, field: str | None = None) -> Iterator[str | None]:
    """A local checkpoint folder from a checkpoint or run folder (its newest ``checkpoint_*``), local
    or in object storage (then its ``model/`` part is downloaded to a temporary folder, removed on exit)."""
    from components.data.storage import is_remote

    if not path:
        yield None
        return
    fs, root = find_checkpoint(path, storage, field)
    if not is_remote(path):
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="radray-init-") as local:
        fs.get(f"{root}/model/", os.path.join(local, "model"), recursive=True)
        yield local


STAGING_PREFIX = "radray-ckpt-"


def _staging_prefix() -> str:
    # host and pid in the name: a restarted worker can tell a killed worker's leftover from a live one's
    return f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def remove_orphaned_staging(tmp: str | None = None) -> list[str]:
    """Remove the checkpoint staging folders this host's killed workers left in ``tmp``.

    A worker stages each checkpoint in a temporary folder and removes it once Ray Train has copied
    it; a worker killed in between cannot. Each folder names its host and process, so only folders of
    this host whose process is gone are removed. Returns the removed paths."""
    import psutil

    tmp = tmp or tempfile.gettempdir()
    mine = f"{STAGING_PREFIX}{socket.gethostname()}-"
    removed = []
    for name in os.listdir(tmp):
        pid = name[len(mine):].split("-", 1)[0] if name.startswith(mine) else ""
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(os.path.join(tmp, name))
    return removed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_steps(cfg: TrainingSections, rows: int, world_size: int) -> tuple[int, int]:
    """``(micro-batches per epoch per worker, total optimizer steps)`` from the training rows."""
    micro = max(1, rows // world_size // cfg.data.batch_size)
    per_epoch = max(1, micro // cfg.strategy.gradient_accumulation_steps)
    total = per_epoch * cfg.run.epochs
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps) if cfg.run.epochs > 0 else cfg.run.max_steps
    return micro, total


def train(session: Session, cfg: TrainingSections, stage, micro_per_epoch: int, total_steps: int) -> dict:
    """Run ``stage`` until ``total_steps`` optimizer steps; returns the last reported metrics."""
    rank, world = session.world_rank, session.world_size
    remove_orphaned_staging()  # a restarted run reclaims the disk its killed workers held
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    with local_checkpoint(cfg.run.init_from, to_dict(cfg.storage), "run.init_from") as init:
        model = stage.build_model(init)
    engine = build_engine(model, cfg.optim, cfg.strategy, total_steps, session.device, world, cfg.data.batch_size)
    state = TrainerState()
    with session.latest_checkpoint() as ckpt:
        if ckpt:
            with engine.writable_weights():  # ZeRO-3 holds partitions; loading needs whole tensors
                stage.load_model(engine.module, os.path.join(ckpt, "model"))
            engine.load(ckpt)
            state = TrainerState.read(ckpt)
            rng = os.path.join(ckpt, f"rng_rank{rank}.pt")
            if os.path.exists(rng):
                torch.set_rng_state(torch.load(rng, weights_only=True))
            if rank == 0:
                print(f"[train] resumed from step {state.step} (epoch {state.epoch}, "
                      f"batch {state.micro_in_epoch})", flush=True)
    if rank == 0 and state.step == 0:
        counts = {k: f"{v:,}" for k, v in stage.parameter_counts(engine.module).items()}
        print(f"[train] {stage.name}: {counts}; strategy {describe(engine)}; {total_steps} steps", flush=True)

    window = _Window(resumed_from=state.step)
    last: dict = {}
    val_set: list[dict] | None = None  # read at the first validation, then reused
    engine.module.train()
    while state.step < total_steps:
        aug = volume_augmentation(cfg.data.augment, seed=hash((cfg.run.seed, rank, state.epoch)))
        batches = session.batches(state.epoch, cfg.data.batch_size)
        t_ready = time.perf_counter()
        seen = 0
        for micro, rows in enumerate(batches):
            seen += 1
            if micro >= micro_per_epoch:
                break
            if micro < state.micro_in_epoch:  # resuming mid-epoch: skip what was consumed
                t_ready = time.perf_counter()
                continue
            t_got = time.perf_counter()
            prng = random.Random(hash((cfg.run.seed, rank, state.epoch, micro)))
            inputs = stage.collate(rows, aug, prng, session.device)
            with engine.autocast():
                loss, tokens = stage.forward(engine.model, inputs)
            stepped = engine.step(loss)
            n = len(next(iter(rows.values())))
            state.micro_in_epoch, state.samples = micro + 1, state.samples + n * world
            window.add(float(loss.detach()), n, tokens, t_got - t_ready, time.perf_counter() - t_ready)
            t_ready = time.perf_counter()
            if not stepped:
                continue
            state.step += 1
            done = state.step >= total_steps
            save = done or state.step % cfg.checkpoint.every_n_steps == 0
            val_every = cfg.run.val_every_n_steps
            validate = val_every is not None and (done or state.step % val_every == 0)
            if save or validate or state.step % cfg.run.report_every_n_steps == 0:
                last = window.metrics(state, engine.lr, world)
                if validate:
                    if val_set is None:
                        val_set = read_validation_batches(session, cfg.data)
                    last["val_loss"] = validation_loss(session, stage, engine, val_set)
                _report(session, stage, engine, state, last, save, rank)
                t_ready = time.perf_counter()  # validating and reporting are not waiting for data
            if done:
                break
        if state.step >= total_steps:
            break
        if seen == 0:
            raise RuntimeError(f"worker {rank} got no training batches in epoch {state.epoch}")
        state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    return last


def _report(session: Session, stage, engine, state: TrainerState, metrics: dict, save: bool, rank: int):
    if not save:
        session.report(metrics)
        return
    directory = tempfile.mkdtemp(prefix=_staging_prefix())
    try:
        full = engine.full_state_dict()  # collective under ZeRO-3: every rank takes part
        engine.save(directory, rank)
        torch.save(torch.get_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
        if rank == 0:
            stage.save_model(engine.module, full, os.path.join(directory, "model"))
            state.write(directory)
        session.report(metrics, checkpoint_dir=directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Window:
    """Running sums between reports: loss, throughput and the share of time spent waiting for data."""

    def __init__(self, resumed_from: int = 0):
        self.resumed_from = resumed_from  # the step this worker group started at (0, or a checkpoint's)
        self.reset()

    def reset(self):
        self.loss = self.n = self.tokens = self.wait = self.total = 0.0
        self.count = 0

    def add(self, loss, n, tokens, wait, total):
        self.loss += loss
        self.count += 1
        self.n += n
        self.tokens += tokens
        self.wait += wait
        self.total += total

    def metrics(self, state: TrainerState, lr: float, world: int) -> dict:
        t = max(self.total, 1e-9)
        out = {"loss": self.loss / max(self.count, 1), "lr": lr, "step": state.step, "epoch": state.epoch,
               "samples_per_s": self.n * world / t, "tokens_per_s": self.tokens * world / t,
               "data_wait_frac": self.wait / t, "samples_seen": state.samples, "resumed_from": self.resumed_from}
        self.reset()
        return out


class LocalSession:
    """One process, no Ray: rows from a list of dicts, checkpoints in a local folder."""

    world_rank, world_size = 0, 1

    def __init__(self, rows: list[dict], checkpoint_root: str, device: str = "cpu",
                 val_rows: list[dict] | None = None):
        self.rows, self.root, self.device = rows, checkpoint_root, torch.device(device)
        self.val_rows = val_rows or []
        self.reports: list[dict] = []
        os.makedirs(checkpoint_root, exist_ok=True)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        ckpts = sorted(d for d in os.listdir(self.root) if d.startswith("checkpoint_")
                       and os.path.isdir(os.path.join(self.root, d)))
        yield os.path.join(self.root, ckpts[-1]) if ckpts else None

    def batches(self, epoch: int, batch_size: int):
        return _batched(self.rows, np.random.default_rng(epoch).permutation(len(self.rows)), batch_size)

    def val_batches(self, batch_size: int):
        return _batched(self.val_rows, range(len(self.val_rows)), batch_size)

    def report(self, metrics: dict, checkpoint_dir: str | None = None):
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, os.path.join(self.root, f"checkpoint_{metrics['step']:08d}"))


def _batched(rows: list[dict], order, batch_size: int):
    """Full batches of ``rows`` in ``order``, as column arrays (the last partial batch is dropped)."""
    order = list(order)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        yield {k: np.array([r[k] for r in chunk]) if k != "volume" else np.stack([r[k] for r in chunk])
               for k in chunk[0]}
