"""Ray glue shared by the training jobs: data streaming, the Ray session, the trainer, progress.

The loop body is ``components.training.loop.train``; this module gives it Ray Train's world
(``get_dataset_shard``, ``get_checkpoint``, ``report``) and builds the ``TorchTrainer`` from the
recipe's sections. Nothing here decides GPU vs CPU: the recipe's ``scaling`` does.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time

import numpy as np

from components.config import from_dict, to_dict
from components.data.storage import is_remote, join, open_fs, pyarrow_fs, upload_tree, write_bytes
from components.evaluation.data import read_samples as read_split_samples
from components.training.loop import plan_steps, train
from components.training.replay import EpochReplay
from ray_jobs.common import init_ray


# --- data -------------------------------------------------------------------------------------

def read_samples(data_path: str, split: str, tasks, storage) -> dict[str, list[dict]]:
    """Sample records of one split and the given tasks, grouped by volume id."""
    out: dict[str, list[dict]] = {}
    for row in read_split_samples(data_path, split, tuple(tasks), storage=storage):
        out.setdefault(row["volume_id"], []).append(row)
    return out


class AttachSamples:
    """Ray Data UDF: volume rows -> one row per (volume, sample) of the wanted tasks."""

    def __init__(self, data_path: str, split: str, tasks, storage):
        self.samples = read_samples(data_path, split, tuple(tasks), storage)

    def __call__(self, batch: dict) -> dict:
        idx, recs = [], []
        for i, vid in enumerate(batch["id"]):
            for rec in self.samples.get(vid, []):
                idx.append(i)
                recs.append(rec)
        cols = ("task", "question_type", "question", "answer", "answer_choice")
        out = {"volume": batch["volume"][idx] if idx else batch["volume"][:0],
               "volume_id": np.array([batch["id"][i] for i in idx], dtype=object)}
        for c in cols:
            out[c] = np.array([r[c] for r in recs], dtype=object)
        out["choices"] = np.array([" || ".join(r["choices"]) for r in recs], dtype=object)
        return out


def split_ids(path: str, filesystem, split: str) -> set[str]:
    """Volume ids of one split, from the two small columns only: counting through the Ray Data
    pipeline would read every volume once more before training starts."""
    import pyarrow.dataset as pads

    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["id", "split"])
    return {i for i, s in zip(table["id"].to_pylist(), table["split"].to_pylist()) if s == split}


def volume_row_bytes(path: str, filesystem) -> float:
    """Mean in-memory size of one row's volume, from the Parquet footers (no data is read)."""
    import pyarrow.dataset as pads

    size = rows = 0
    for fragment in pads.dataset(path, filesystem=filesystem, format="parquet").get_fragments():
        meta = fragment.metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            size += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                        if group.column(c).path_in_schema.split(".")[0] == "volume")
    return size / max(rows, 1)


def replay_fits(cfg, rows: int, micro: int, total: int) -> bool:
    """Whether workers keep their shard in memory after the first epoch (``components.training.replay``):
    only when the run lasts more than one epoch and every worker's shard fits ``data.replay_mb``."""
    if cfg.data.replay_mb <= 0 or total <= micro // cfg.strategy.gradient_accumulation_steps:
        return False
    pfs, path = pyarrow_fs(join(cfg.data.path, "volumes"), to_dict(cfg.storage))
    return rows // cfg.scaling.num_workers * volume_row_bytes(path, pfs) <= cfg.data.replay_mb * 2**20


def training_dataset(cfg, stage, split: str | None = None):
    """``(ray.data.Dataset, number of rows)`` for the stage: volumes, or volumes joined with samples,
    of ``split`` (default ``data.split``; ``data.limit`` applies to that one only)."""
    import ray
    from ray.data import ActorPoolStrategy

    storage = to_dict(cfg.storage)
    pfs, path = pyarrow_fs(join(cfg.data.path, "volumes"), storage)
    # fractional CPUs keep streaming alive next to training workers on small machines
    cpus = cfg.data.cpus_per_task
    vols = ray.data.read_parquet(path, filesystem=pfs, columns=["id", "split", "volume"], num_cpus=cpus)
    split = split or cfg.data.split
    vols = vols.filter(lambda r: r["split"] == split, num_cpus=cpus)
    ids = split_ids(path, pfs, split)
    if not stage.needs_samples:
        ds = vols.select_columns(["id", "volume"])
        rows = len(ids)
    else:
        tasks = tuple(getattr(stage, "tasks", cfg.data.tasks))
        samples = read_samples(cfg.data.path, split, tasks, storage)
        rows = sum(len(v) for k, v in samples.items() if k in ids)
        ds = vols.map_batches(AttachSamples, fn_constructor_kwargs=dict(
            data_path=cfg.data.path, split=split, tasks=tasks, storage=storage),
            batch_size=8, batch_format="numpy", compute=ActorPoolStrategy(size=1), num_cpus=0)  # ListFiles needs a whole free CPU
    if cfg.data.limit is not None and split == cfg.data.split:
        ds, rows = ds.limit(cfg.data.limit), min(rows, cfg.data.limit)
    if rows == 0:
        raise ValueError(f"no training rows in {cfg.data.path} (split {split!r}); run ray_jobs.preprocess first")
    # The loop reports its own progress. Ray Data would draw its bars inside the split coordinator, and
    # they would reach the driver as one log line per refresh, hundreds per run.
    ds.context.enable_progress_bars = False
    return ds, rows


# --- the Ray session ------------------------------------------------------------------------------

@contextlib.contextmanager
def checkpoint_directory(ckpt):
    """A Ray checkpoint (or None) as a local folder (or None) for the loop."""
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield d


class RaySession:
    """What the loop needs from Ray Train, on one worker."""

    def __init__(self, seed: int, shuffle_buffer: int, prefetch_batches: int = 1, replay: bool = False):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.seed, self.shuffle_buffer, self.prefetch_batches = seed, shuffle_buffer, prefetch_batches
        self.shard = ray.train.get_dataset_shard("train")
        self.replay = EpochReplay(seed * 1000 + self.world_rank) if replay else None
        self.report_wait_s = 0.0
        self.val_shard = None

    def latest_checkpoint(self):
        import ray.train

        return checkpoint_directory(ray.train.get_checkpoint())

    def batches(self, epoch: int, batch_size: int):
        kwargs = {"prefetch_batches": self.prefetch_batches}
        if self.shuffle_buffer:
            kwargs.update(local_shuffle_buffer_size=self.shuffle_buffer,
                          local_shuffle_seed=self.seed * 1000 + epoch * 10 + self.world_rank)
        if self.replay is None:
            return _numpy_batches(self.shard, batch_size, **kwargs)
        return self.replay.batches(epoch, batch_size, lambda: _numpy_batches(self.shard, batch_size, **kwargs))

    def val_batches(self, batch_size: int):
        import ray.train

        if self.val_shard is None:  # asked for only when the recipe validates
            self.val_shard = ray.train.get_dataset_shard("val")
        return _numpy_batches(self.val_shard, batch_size)

    def report(self, metrics: dict, checkpoint_dir: str | None = None):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # the worker's clock (the controller stamps ``time`` only when it collects a report, up to its
        # poll interval later), how long the previous report held training up, and CPU seconds used by
        # this process and by the training thread (throughput per CPU second holds when cores are shared)
        metrics = {**metrics, "reported_at": time.time(), "report_wait_s": self.report_wait_s,
                   "cpu_s": time.process_time(), "thread_cpu_s": time.thread_time()}
        t = time.perf_counter()
        ray.train.report(metrics, checkpoint=ckpt)
        self.report_wait_s = time.perf_counter() - t


def _numpy_batches(shard, batch_size: int, **kwargs):
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, **kwargs):
        if "choices" in batch:
            batch["choices"] = np.array([c.split(" || ") if c else [] for c in batch["choices"]], dtype=object)
        yield batch


def worker_loop(config: dict):
    """Entry point of every Ray Train worker."""
    import importlib

    module, _, name = config["job_class"].rpartition(".")
    job_cls = getattr(importlib.import_module(module), name)
    cfg = from_dict(job_cls, config["job"])
    stage = cfg.make_stage()
    session = RaySession(cfg.run.seed, cfg.data.shuffle_buffer, cfg.data.prefetch_batches, config.get("replay", False))
    train(session, cfg, stage, config["micro_per_epoch"], config["total_steps"])


# --- progress, logs, curves on the controller -------------------------------------------------------

CLOCKS = ("step", "time", "reported_at", "cpu_s", "thread_cpu_s")
"""Report fields that are clock readings, not scalars to plot."""


TENSORBOARD_UPLOAD_EVERY_S = 60.0
"""With runs in object storage, how often the TensorBoard logs are copied there between checkpoints."""


def _progress_callback(total_steps: int, metrics_uri: str, tb_dir: str | None, storage: dict,
                       tb_uri: str | None = None):
    """``tb_uri``: where in object storage the TensorBoard logs of ``tb_dir`` (on the driver's node, as
    the controller is) are copied, at every checkpoint and at most every ``TENSORBOARD_UPLOAD_EVERY_S``."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        """Runs on the Train controller: a progress line with ETA, TensorBoard scalars, a metrics log."""

        def __init__(self):
            self.history, self.t0, self.step0, self.writer, self.written = [], None, None, None, False
            self.uploaded = 0.0

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0]) if metrics else {}
            if "step" not in m:
                return
            now = time.time()
            if self.t0 is None:
                self.t0, self.step0 = now, m["step"]
                self.history = _read_history(metrics_uri, storage, before=m["step"])
            m["time"] = now
            self.history.append(m)
            rate = (m["step"] - self.step0) / max(now - self.t0, 1e-9)
            eta = (total_steps - m["step"]) / rate if rate > 0 else float("nan")
            val = f"val_loss {m['val_loss']:.4f} " if "val_loss" in m else ""
            print(f"[train] step {m['step']}/{total_steps} ({100 * m['step'] / total_steps:.0f}%) "
                  f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s "
                  f"{m['tokens_per_s']:.0f} tokens/s data-wait {100 * m['data_wait_frac']:.0f}% "
                  f"{val}ETA {_fmt(eta)}{' [checkpoint]' if checkpoint else ''}", flush=True)
            if tb_dir:
                if self.writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(tb_dir)
                for k, v in m.items():
                    if isinstance(v, (int, float)) and k not in CLOCKS:
                        self.writer.add_scalar(f"train/{k}", v, m["step"])
                self.writer.flush()
                if tb_uri and (checkpoint or now - self.uploaded >= TENSORBOARD_UPLOAD_EVERY_S):
                    upload_tree(tb_dir, tb_uri, storage)
                    self.uploaded = now
            if self.written and not is_remote(metrics_uri):  # one line per report, not the whole log again
                with open(metrics_uri, "a", encoding="utf-8") as f:
                    f.write(json.dumps(m) + "\n")
            else:  # object stores cannot append; the first write also drops what a resumed run redoes
                write_bytes(metrics_uri, "".join(json.dumps(h) + "\n" for h in self.history).encode(), storage)
                self.written = True

    return Progress()


def _read_history(uri: str, storage, before: int) -> list[dict]:
    fs, path = open_fs(uri, storage)
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return [r for r in rows if r["step"] < before]


def _fmt(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def plot_loss_curve(history: list[dict], title: str, path: str, storage=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", ms=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue(), storage)
    return path


# --- the trainer -----------------------------------------------------------------------------------

def run_dir(cfg) -> str:
    base = cfg.run.storage_path if is_remote(cfg.run.storage_path) else os.path.abspath(cfg.run.storage_path)
    return join(base, cfg.run.name)


def fit(cfg, job_class: str, callbacks: list | None = None) -> dict:
    """Build and run the TorchTrainer for a job config; returns a summary with paths.
    ``callbacks``: further Ray Train callbacks (a sweep trial forwards the reports to Tune with one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.ray)
    storage = to_dict(cfg.storage)
    if cfg.run.init_from and not is_remote(cfg.run.init_from):
        cfg.run.init_from = os.path.abspath(cfg.run.init_from)  # workers run in another directory
    if not is_remote(cfg.data.path):
        cfg.data.path = os.path.abspath(cfg.data.path)
    llm = getattr(getattr(cfg, "model", None), "llm", None)
    if llm is not None and llm.tokenizer and not llm.tokenizer.startswith("pkg:"):
        llm.tokenizer = os.path.abspath(os.path.expanduser(llm.tokenizer))
    stage = cfg.make_stage()
    ds, rows = training_dataset(cfg, stage)
    sc = cfg.scaling
    micro, total = plan_steps(cfg, rows, sc.num_workers)
    replay = replay_fits(cfg, rows, micro, total)
    print(f"[train] {cfg.run.name}: {rows} training rows, {sc.num_workers} workers x batch {cfg.data.batch_size}"
          f" -> {micro} batches per worker per epoch, {total} optimizer steps"
          f"{'; epochs after the first replay from memory' if replay else ''}", flush=True)
    datasets = {"train": ds}
    if cfg.run.val_every_n_steps is not None:  # a second dataset, sharded like the first
        datasets["val"], _ = training_dataset(cfg, stage, split=cfg.data.val_split)
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        resources["GPU"] = 1
    rdir = run_dir(cfg)
    if is_remote(cfg.run.storage_path):
        pfs, spath = pyarrow_fs(cfg.run.storage_path, storage)
        storage_kwargs = dict(storage_path=spath, storage_filesystem=pfs)
        # TensorBoard appends to its event files, which object stores cannot: it writes on local disk and
        # the logs are copied next to the run
        tb_dir = os.path.abspath(os.path.join("runs", cfg.run.name, "tensorboard"))
        tb_copy = join(rdir, "tensorboard")
    else:
        storage_kwargs = dict(storage_path=os.path.abspath(cfg.run.storage_path))
        tb_dir, tb_copy = os.path.join(rdir, "tensorboard"), None
    metrics_uri = join(rdir, "metrics.jsonl")
    env = {"DS_ACCELERATOR": "cuda" if sc.use_gpu else "cpu", "OMP_NUM_THREADS": str(max(1, int(sc.cpus_per_worker)))}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": to_dict(cfg), "job_class": job_class, "micro_per_epoch": micro, "replay": replay,
                           "total_steps": total},
        torch_config=TorchConfig(backend=None if cfg.strategy.backend == "auto" else cfg.strategy.backend),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(name=cfg.run.name, **storage_kwargs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=[_progress_callback(total, metrics_uri, tb_dir, storage, tb_copy), *(callbacks or [])],
                             worker_runtime_env={"env_vars": env}),
        datasets=datasets,
    )
    t0 = time.time()
    result = trainer.fit()
    history = _read_history(metrics_uri, storage, before=10**12)
    curve = plot_loss_curve(history, f"{cfg.run.name}: training loss", join(rdir, "loss_curve.png"), storage)
    if tb_copy and os.path.isdir(tb_dir):  # the last reports since the controller's last copy
        upload_tree(tb_dir, tb_copy, storage)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt and is_remote(cfg.run.storage_path):  # Ray gives the path within the bucket
        ckpt = cfg.run.storage_path.split("://", 1)[0] + "://" + ckpt.lstrip("/")
    summary = {"run": cfg.run.name, "checkpoint": ckpt, "model_dir": join(ckpt, "model") if ckpt else None,
               "loss_curve": curve, "tensorboard": tb_dir, "tensorboard_copy": tb_copy,
               "metrics": metrics_uri, "steps": total,
               "final": result.metrics, "first_loss": history[0]["loss"] if history else None,
               "seconds": round(time.time() - t0, 1)}
    print(f"[train] done in {summary['seconds']} s: checkpoint {ckpt}\n[train] loss curve {curve}; "
          f"TensorBoard: tensorboard --logdir {tb_dir}"
          f"{f' (copied to {tb_copy})' if tb_copy else ''}", flush=True)
    return summary
