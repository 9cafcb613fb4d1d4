"""Ray Train overhead: the same model, batch and steps as a bare PyTorch loop and as a Ray Train run.

    python -m benchmarks.train_overhead [--steps 40] [--data data/preprocessed/phantom-quickstart]

Prints steady-state steps/s for (a) a bare loop in this process over batches held in memory and
(b) Ray Train with one worker streaming the same Parquet shards (start-up printed separately), the
ratio, then DDP vs DeepSpeed ZeRO-2 on two CPU workers, and the share of step time spent waiting
for data. Run the quickstart (or ray_jobs.preprocess) first so the shards exist.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

MODEL = {"encoder": {"volume_size": [32, 64, 64], "patch_size": [8, 8, 8], "width": 192, "depth": 4, "heads": 4},
         "decoder_width": 96, "decoder_depth": 1, "decoder_heads": 4, "mask_ratio": 0.75}
BATCH = 4


def bare_loop(data: str, steps: int) -> float:
    import pyarrow.dataset as pads
    import torch

    from components.config import from_dict
    from components.models.pretraining.mae import MAEConfig, build_mae

    torch.set_num_threads(1)  # a Ray worker with one CPU gets one thread too
    torch.manual_seed(0)
    table = pads.dataset(os.path.join(data, "volumes"), format="parquet").to_table(columns=["volume", "split"])
    vols = [np.asarray(v, np.float32) for v, s in zip(table["volume"].to_numpy(zero_copy_only=False),
                                                      table["split"].to_pylist()) if s == "train"]
    vols = np.stack([np.asarray(v).reshape(1, 32, 64, 64) for v in vols])
    model = build_mae(from_dict(MAEConfig, MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.as_tensor(vols[i:i + BATCH]) for i in range(0, len(vols) - BATCH + 1, BATCH)]

    def step(i):
        loss = model(batches[i % len(batches)])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps / (time.perf_counter() - t)


def ray_run(data: str, steps: int, workers: int, strategy: list[str]) -> dict:
    from components.config import from_dict
    from ray_jobs.pretrain_mae import MAEJobConfig
    from ray_jobs.train_common import fit

    out = tempfile.mkdtemp(prefix="radray-bench-train-")
    try:
        cfg = from_dict(MAEJobConfig, {
            "model": MODEL, "data": {"path": os.path.abspath(data), "batch_size": BATCH, "augment": {"enabled": False},
                                     "shuffle_buffer": 0},
            "optim": {"lr": 1e-3}, "scaling": {"num_workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.5},
            "checkpoint": {"every_n_steps": 10**6}, "run": {"name": "bench", "storage_path": out, "epochs": 100,
                                                           "max_steps": steps, "report_every_n_steps": 5}})
        for item in strategy:
            key, value = item.split("=")
            section, field = key.split(".")
            setattr(getattr(cfg, section), field, int(value) if value.isdigit() else value)
        t0 = time.time()
        summary = fit(cfg, "ray_jobs.pretrain_mae.MAEJobConfig")
        wall = time.time() - t0
        with open(os.path.join(out, "bench", "metrics.jsonl"), encoding="utf-8") as f:
            hist = [json.loads(line) for line in f if line.strip()]
        steady = hist[1:]  # the first window includes pipeline start-up
        rate = (steady[-1]["step"] - hist[0]["step"]) / (steady[-1]["time"] - hist[0]["time"])
        wait = float(np.mean([h["data_wait_frac"] for h in steady]))
        return {"steps_per_s": rate, "startup_s": wall - steps / rate, "data_wait": wait, "summary": summary}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--data", default="data/preprocessed/phantom-quickstart")
    args = ap.parse_args()
    os.environ.setdefault("RADRAY_PROGRESS", "0")
    from ray_jobs.common import RayConfig, init_ray

    init_ray(RayConfig())
    bare = bare_loop(args.data, args.steps)
    one = ray_run(args.data, args.steps, 1, [])
    ddp = ray_run(args.data, args.steps, 2, [])
    zero2 = ray_run(args.data, args.steps, 2, ["strategy.name=deepspeed", "strategy.zero_stage=2"])
    print(f"\nMAE ViT (width 192, depth 4) on 32x64x64, batch {BATCH} per worker, {args.steps} steps, CPU")
    print(f"(a) bare PyTorch loop, 1 process:       {bare:6.2f} steps/s")
    print(f"(b) Ray Train, 1 worker (Parquet):      {one['steps_per_s']:6.2f} steps/s   start-up {one['startup_s']:.1f} s")
    print(f"    Ray Train overhead:                 {100 * (bare / one['steps_per_s'] - 1):+.1f} %  (target <= 10 %)")
    print(f"(c) DDP, 2 workers:                     {ddp['steps_per_s']:6.2f} steps/s   start-up {ddp['startup_s']:.1f} s")
    print(f"    DeepSpeed ZeRO-2, 2 workers:        {zero2['steps_per_s']:6.2f} steps/s   start-up {zero2['startup_s']:.1f} s")
    print(f"    ZeRO-2 / DDP:                       {zero2['steps_per_s'] / ddp['steps_per_s']:.2f}x")
    print(f"(d) data-wait share of step time (streaming Parquet): 1 worker {100 * one['data_wait']:.1f} %, "
          f"DDP {100 * ddp['data_wait']:.1f} %, ZeRO-2 {100 * zero2['data_wait']:.1f} %")


if __name__ == "__main__":
    main()
