"""Frozen-feature cache: training steps of the quickstart finetune model with and without it.

    python -m benchmarks.feature_cache [--steps 300] [--data data/preprocessed/phantom-quickstart]

The model is the quickstart finetune recipe's (3D ViT + per-slice SigLIP, both frozen, TG-IS, a small
Llama trained fully), one thread, batches of 4 drawn from the training split's real samples. The
uncached loop runs before and after the cached one (the CPU may be shared; ratios use their mean).
The cached run's steps are timed after one pass over the training volumes, when every lookup hits,
which is the state of any run past its first epoch. Also printed: the cache's size per volume and the
cost of a digest. Run the quickstart first (it writes the shards and the refitted tokenizer).
"""
from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np

RECIPE = "ray_jobs/configs/quickstart/finetune.yaml"
BATCH = 4


def load_split(data: str):
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    columns = ["id", "volume", "split"]
    table = pads.dataset(os.path.join(data, "volumes"), format="parquet").to_table(columns=columns)
    vols = {i: np.asarray(v, np.float32).reshape(1, 32, 64, 64)
            for i, v, s in zip(table["id"].to_pylist(), table["volume"].to_numpy(zero_copy_only=False),
                               table["split"].to_pylist()) if s == "train"}
    samples = [r for r in pq.read_table(os.path.join(data, "samples.parquet")).to_pylist()
               if r["split"] == "train" and r["volume_id"] in vols and r["task"] in ("caption", "vqa_closed", "vqa_open")]
    return vols, samples


def build(cache_mb: float):
    import torch

    from components.config import load
    from components.models.builders import build_vlm
    from ray_jobs.train_vlm import VLMJobConfig

    torch.manual_seed(0)
    cfg = load(VLMJobConfig, RECIPE, [f"model.frozen_feature_cache_mb={cache_mb}"])
    model = build_vlm(cfg.model).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def batches(vols, samples, model, n: int, seed: int):
    import torch

    from components.data.prompts import format_sample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rows = rng.sample(samples, BATCH)
        b = model.collate([model.build_example(*format_sample(r, rng)) for r in rows])
        b["volume"] = torch.as_tensor(np.stack([vols[r["volume_id"]] for r in rows]))
        out.append(b)
    return out


def run_steps(model, opt, items) -> float:
    keys = ("volume", "input_ids", "attention_mask", "labels", "question_ids", "question_attention_mask")
    t0 = time.perf_counter()
    for b in items:
        loss = model(**{k: b[k] for k in keys}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(items)


def main(argv=None):
    import torch

    from components.models.feature_cache import sample_digest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default="data/preprocessed/phantom-quickstart")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a Ray worker with one CPU gets one thread too
    vols, samples = load_split(args.data)

    plain, plain_opt = build(0)
    cached, cached_opt = build(1024)
    items = batches(vols, samples, plain, args.steps, seed=0)
    run_steps(plain, plain_opt, items[:10])  # warm-up
    before = run_steps(plain, plain_opt, items)
    # one pass over every training volume fills the cache, as a run's first epoch does
    ids = list(vols)
    with torch.no_grad():
        for i in range(0, len(ids), 8):
            x = torch.as_tensor(np.stack([vols[k] for k in ids[i:i + 8]]))
            cached._encode("encoder_3d", x)
            cached._encode("encoder_2d", x)
    caches = cached.feature_caches
    filled = {n: (c.hits, c.misses) for n, c in caches.items()}
    warm = run_steps(cached, cached_opt, items)
    after = run_steps(plain, plain_opt, items)
    uncached = (before + after) / 2

    per_volume = sum(c.bytes for c in caches.values()) / len(ids) / 1024
    x = torch.as_tensor(vols[ids[0]])
    t0 = time.perf_counter()
    for _ in range(50):
        sample_digest(x)
    digest_ms = (time.perf_counter() - t0) / 50 * 1e3
    hits = sum(c.hits - filled[n][0] for n, c in caches.items())
    lookups = hits + sum(c.misses - filled[n][1] for n, c in caches.items())
    print(f"[feature_cache] {args.steps} steps of batch {BATCH}, {len(ids)} training volumes, one thread")
    print(f"  uncached          {uncached * 1e3:7.1f} ms/step  (before {before * 1e3:.1f}, after {after * 1e3:.1f})")
    print(f"  cached, warm      {warm * 1e3:7.1f} ms/step  hit rate {hits / lookups:.3f} (timed steps)")
    print(f"  speed-up          {uncached / warm:7.2f}x")
    print(f"  cache per volume  {per_volume:7.1f} KiB (both encoders); digest {digest_ms:.2f} ms per volume")


if __name__ == "__main__":
    main()
