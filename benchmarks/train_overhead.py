"""Ray Train overhead: the same model, batch and steps as a bare PyTorch loop and as a Ray Train run.

    python -m benchmarks.train_overhead [--steps 200] [--data data/preprocessed/phantom-quickstart]

(a) A bare loop in this process, over batches held in memory, timed before and after the Ray runs
    (the CPU may be shared; both figures are printed and ratios use their mean).
(b) Ray Train with one worker streaming the same Parquet shards. Steady-state steps/s comes from the
    worker's own clock, from the report closing the warm-up window (--steps/4 steps) to the last one,
    with reports as often as that window. Start-up (fit() to the first step, less the warm-up steps at
    the steady rate) and teardown are printed separately. CPU seconds per step (the training thread's,
    and the worker process's with Ray's own threads) compare fairly even when other work shares the cores.
(c) DDP and DeepSpeed ZeRO-2 on two CPU workers.
(d) The data-wait share of step time, and one worker streaming every epoch from Parquet
    (``data.replay_mb=0``), where each epoch restarts the Ray Data pipeline.
(e) The controller's progress callback: time per report, against the 2 s between the controller's polls.
(f) Start-up of two workers with Ray Data's default pool of 32 Parquet footer readers against the pool
    of one per CPU that a locally started Ray gets (``ray_jobs.common.size_ray_data_for_local``); Ray is restarted
    for each, in this process.
Run the quickstart (or ray_jobs.preprocess) first so the shards exist.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np

MODEL = {"encoder": {"volume_size": [32, 64, 64], "patch_size": [8, 8, 8], "width": 192, "depth": 4, "heads": 4},
         "decoder_width": 96, "decoder_depth": 1, "decoder_heads": 4, "mask_ratio": 0.75}
BATCH = 4


def train_volumes(data: str) -> np.ndarray:
    import pyarrow.dataset as pads

    table = pads.dataset(os.path.join(data, "volumes"), format="parquet").to_table(columns=["volume", "split"])
    vols = [np.asarray(v, np.float32) for v, s in zip(table["volume"].to_numpy(zero_copy_only=False),
                                                      table["split"].to_pylist()) if s == "train"]
    return np.stack([v.reshape(1, 32, 64, 64) for v in vols])


def bare_loop(vols: np.ndarray, steps: int, warmup: int) -> dict:
    import torch

    from components.config import from_dict
    from components.models.pretraining.mae import MAEConfig, build_mae

    torch.set_num_threads(1)  # a Ray worker with one CPU gets one thread too
    torch.manual_seed(0)
    model = build_mae(from_dict(MAEConfig, MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.as_tensor(vols[i:i + BATCH]) for i in range(0, len(vols) - BATCH + 1, BATCH)]

    def step(i):
        loss = model(batches[i % len(batches)])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    t, cpu = time.perf_counter(), time.thread_time()
    for i in range(steps):
        step(i)
    return {"steps_per_s": steps / (time.perf_counter() - t), "cpu_per_step": (time.thread_time() - cpu) / steps}


def ray_run(data: str, steps: int, warmup: int, workers: int, overrides: dict) -> dict:
    from components.config import from_dict
    from ray_jobs.pretrain_mae import MAEJobConfig
    from ray_jobs.train_common import fit

    out = tempfile.mkdtemp(prefix="radray-bench-train-")
    try:
        job = {"model": MODEL, "data": {"path": os.path.abspath(data), "batch_size": BATCH,
                                        "augment": {"enabled": False}, "shuffle_buffer": 0},
               "optim": {"lr": 1e-3}, "scaling": {"num_workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.5},
               "checkpoint": {"every_n_steps": 10**6},
               "run": {"name": "bench", "storage_path": out, "epochs": 10**4, "max_steps": warmup + steps,
                       "report_every_n_steps": warmup}}
        for key, value in overrides.items():
            section, field = key.split(".")
            job.setdefault(section, {})[field] = value
        t0 = time.time()
        fit(from_dict(MAEJobConfig, job), "ray_jobs.pretrain_mae.MAEJobConfig")
        t_end = time.time()
        with open(os.path.join(out, "bench", "metrics.jsonl"), encoding="utf-8") as f:
            hist = [json.loads(line) for line in f if line.strip()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    first, last, steady = hist[0], hist[-1], hist[1:]
    n = last["step"] - first["step"]
    rate = n / (last["reported_at"] - first["reported_at"])
    return {"steps_per_s": rate, "startup_s": first["reported_at"] - t0 - first["step"] / rate,
            # CPU seconds per step: of the training thread, and of the worker's whole process
            "cpu_per_step": (last["thread_cpu_s"] - first["thread_cpu_s"]) / n,
            "process_cpu_per_step": (last["cpu_s"] - first["cpu_s"]) / n,
            "teardown_s": t_end - last["reported_at"],
            "data_wait": float(np.mean([h["data_wait_frac"] for h in steady])),
            "report_wait_s": float(np.mean([h["report_wait_s"] for h in steady]))}


def callback_cost(reports: int = 50) -> float:
    """Seconds per ``after_report`` of the controller's progress callback (metrics log + TensorBoard)."""
    from ray_jobs.train_common import _progress_callback

    out = tempfile.mkdtemp(prefix="radray-bench-cb-")
    try:
        cb = _progress_callback(reports, os.path.join(out, "metrics.jsonl"), os.path.join(out, "tb"), {})
        m = {"loss": 1.0, "lr": 1e-3, "samples_per_s": 30.0, "tokens_per_s": 0.0, "data_wait_frac": 0.0,
             "epoch": 0, "samples_seen": 0, "resumed_from": 0, "reported_at": 0.0, "report_wait_s": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            t = time.perf_counter()
            for step in range(1, reports + 1):
                cb.after_report(None, [{**m, "step": step}], None)
            return (time.perf_counter() - t) / reports
    finally:
        shutil.rmtree(out, ignore_errors=True)


def startup_by_footer_readers(data: str, steps: int, warmup: int) -> dict[str, float]:
    """Start-up seconds of a two-worker run on a fresh local Ray, by footer-reader pool size."""
    import ray

    from ray_jobs.common import RayConfig, init_ray

    key, out = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", {}
    before = os.environ.pop(key, None)
    try:
        for label, value in (("Ray default", "32"), ("one per CPU", None)):
            ray.shutdown()
            if value is not None:
                os.environ[key] = value
            init_ray(RayConfig())
            label = f"{label} ({os.environ[key]})"
            out[label] = ray_run(data, steps, warmup, 2, {})["startup_s"]
            os.environ.pop(key, None)
    finally:
        if before is not None:
            os.environ[key] = before
    return out


def _line(label: str, r: dict) -> str:
    return (f"{label:<40}{r['steps_per_s']:6.2f} steps/s   start-up {r['startup_s']:.1f} s, "
            f"teardown {r['teardown_s']:.1f} s, data-wait {100 * r['data_wait']:.1f} %, "
            f"report wait {r['report_wait_s']:.2f} s; CPU ms/step: training thread "
            f"{1000 * r['cpu_per_step']:.0f}, worker process {1000 * r['process_cpu_per_step']:.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steady-state steps per run (after a warm-up of steps/4)")
    ap.add_argument("--data", default="data/preprocessed/phantom-quickstart")
    args = ap.parse_args()
    os.environ.setdefault("RADRAY_PROGRESS", "0")
    from ray_jobs.common import RayConfig, init_ray

    init_ray(RayConfig())
    steps, warmup = args.steps, max(1, args.steps // 4)
    vols = train_volumes(args.data)
    bare = [bare_loop(vols, steps, warmup)]
    one = ray_run(args.data, steps, warmup, 1, {})
    ddp = ray_run(args.data, steps, warmup, 2, {})
    zero2 = ray_run(args.data, steps, warmup, 2, {"strategy.name": "deepspeed", "strategy.zero_stage": 2})
    stream = ray_run(args.data, steps, warmup, 1, {"data.replay_mb": 0})
    bare.append(bare_loop(vols, steps, warmup))
    ref = float(np.mean([b["steps_per_s"] for b in bare]))
    ref_cpu = float(np.mean([b["cpu_per_step"] for b in bare]))
    per_epoch = len(vols) // BATCH
    print(f"\nMAE ViT (width 192, depth 4) on 32x64x64, batch {BATCH} per worker, {warmup} warm-up + {steps} "
          f"timed steps, CPU; {len(vols)} training volumes ({per_epoch} steps per epoch with one worker)")
    print(f"(a) bare PyTorch loop, 1 process:       {bare[0]['steps_per_s']:6.2f} steps/s before, "
          f"{bare[1]['steps_per_s']:.2f} after (mean {ref:.2f}); CPU ms/step {1000 * ref_cpu:.0f}")
    print(_line("(b) Ray Train, 1 worker (Parquet):", one))
    print(f"    Ray Train overhead, wall clock:     {100 * (ref / one['steps_per_s'] - 1):+.1f} %  (target <= 10 %)")
    print(f"    per CPU second, training thread:    {100 * (one['cpu_per_step'] / ref_cpu - 1):+.1f} %; "
          f"worker process: {100 * (one['process_cpu_per_step'] / ref_cpu - 1):+.1f} %")
    print(_line("(c) DDP, 2 workers:", ddp))
    print(_line("    DeepSpeed ZeRO-2, 2 workers:", zero2))
    print(f"    ZeRO-2 / DDP:                       {zero2['steps_per_s'] / ddp['steps_per_s']:.2f}x")
    print(_line("(d) 1 worker, every epoch from Parquet:", stream))
    restart = (1 / stream["steps_per_s"] - 1 / one["steps_per_s"]) * per_epoch
    print(f"    Ray Data pipeline restart:          {restart:.2f} s per epoch "
          f"(epochs after the first replay from memory in (b))")
    print(f"(e) controller progress callback:       {1000 * callback_cost():.1f} ms per report "
          f"(the controller polls workers every 2 s)")
    startup = startup_by_footer_readers(args.data, steps, warmup)
    (base, t_base), (ours, t_ours) = startup.items()
    print(f"(f) start-up by Parquet footer readers: {base} {t_base:.1f} s, {ours} {t_ours:.1f} s "
          f"({t_ours / t_base:.2f}x)")


if __name__ == "__main__":
    main()
