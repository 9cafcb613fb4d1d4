"""Batch size of the quickstart finetune on Ray Train: the same samples in batches of 4 and of 8 per worker.

    python -m benchmarks.finetune_batch [--samples 6400] [--rounds 2] [--runs runs/quickstart]

The quickstart's finetune recipe (two CPU workers, DDP, both encoders' outputs cached) runs from the
quickstart's own align checkpoint, once with ``data.batch_size=4`` and once with 8 and half the steps,
in alternating rounds (the CPU may be shared; every round is printed, the ratio uses the means). The
rate is the steady state after the first epoch, when each worker replays its shard from memory: samples
between the report that closes the first half of the run and the last one, over the workers' clock
between those reports. A per-step cost (DDP's gradient exchange, waiting for the slower worker, the
loop's own work) is paid half as often per sample with batches of 8. Run the quickstart first.
"""
from __future__ import annotations

import argparse
import json
import os


def checkpoint(runs: str, name: str) -> str:
    from components.training.loop import find_checkpoint

    try:
        return os.path.abspath(find_checkpoint(os.path.join(runs, name))[1])
    except FileNotFoundError as e:
        raise SystemExit(f"{e}: run `python -m ray_jobs.quickstart` first") from None


def steady_rate(metrics_path: str) -> float:
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8")]
    first, last = rows[len(rows) // 2 - 1], rows[-1]
    return (last["samples_seen"] - first["samples_seen"]) / (last["reported_at"] - first["reported_at"])


def run(batch: int, samples: int, args, tag: str) -> float:
    from components.config import load
    from ray_jobs.train_common import fit
    from ray_jobs.train_vlm import VLMJobConfig

    steps = samples // (2 * batch)
    job = load(VLMJobConfig, "ray_jobs/configs/quickstart/finetune.yaml", [
        f"data.path={args.data}", f"data.batch_size={batch}", f"run.max_steps={steps}",
        f"run.report_every_n_steps={max(1, steps // 16)}", f"checkpoint.every_n_steps={steps}",
        f"run.storage_path={args.out}", f"run.name=batch{batch}-{tag}",
        f"model.llm.tokenizer={args.tokenizer}",
        f"model.encoder_3d.checkpoint={checkpoint(args.runs, 'siglip')}",
        f"model.encoder_2d.checkpoint={checkpoint(args.runs, 'siglip-2d')}",
        f"run.init_from={checkpoint(args.runs, 'align')}"])
    return steady_rate(fit(job, f"{VLMJobConfig.__module__}.{VLMJobConfig.__qualname__}")["metrics"])


def main(argv=None):
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6400, help="samples per run (both workers together)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", default="runs/quickstart")
    ap.add_argument("--data", default="data/preprocessed/phantom-quickstart")
    ap.add_argument("--tokenizer", default="data/tokenizers/phantom-quickstart")
    args = ap.parse_args(argv)
    rates: dict[int, list[float]] = {4: [], 8: []}
    with tempfile.TemporaryDirectory(prefix="radray-bench-") as out:
        args.out = out
        for r in range(args.rounds):
            for batch in (4, 8):
                rates[batch].append(run(batch, args.samples, args, f"r{r}"))
                print(f"[finetune_batch] round {r + 1}: batch {batch}: {rates[batch][-1]:.1f} samples/s", flush=True)
    mean = {b: sum(v) / len(v) for b, v in rates.items()}
    print(f"[finetune_batch] {args.samples} samples per run, 2 CPU workers, steady state after the first epoch")
    for b in (4, 8):
        print(f"  batch {b} per worker: {mean[b]:6.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in rates[b])})")
    print(f"  batch 8 / batch 4: {mean[8] / mean[4]:.2f}x")


if __name__ == "__main__":
    main()
