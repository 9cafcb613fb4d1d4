"""Evaluation speed, each against its baseline in the same process.

    python -m benchmarks.eval_throughput [--pairs 2000] [--requests 64] [--batch 8] [--skip-metrics]

(a) The text-metric suite on ``--pairs`` synthetic pairs vs the reference implementations called one
    pair at a time (``benchmarks.eval_metrics``): times, ratio, largest difference.
(b) Ray Serve throughput of the evaluation's VolumeVLM deployment (``ray_jobs.serve_app``) with
    dynamic batching (``max_batch_size=--batch``) vs ``max_batch_size=1``: the same application and
    the same ``--requests`` requests (fixed-seed volumes and questions) sent at once, on a local
    Ray with 2 CPUs. Both settings are deployed side by side and timed in alternating rounds
    (``--rounds``); the best round of each is compared, so load from other work on a shared machine
    tilts neither. The model is the quickstart's shape (tiny 3D ViT, conv3d perceiver, 2-layer LLM
    with SmolLM2's tokenizer), built untrained: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Which organ contains the largest lesion?", "In which plane is this CT scan acquired?",
             "What is the contrast phase of this scan?", "Is there a lesion in the liver?",
             "Where is the largest lesion located within its organ?"]
QUICKSTART_LLM = ["llm.source=config",
                  "llm.config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
                  "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 49152, max_position_embeddings: 512, "
                  "tie_word_embeddings: false}"]


def build_model(folder: str) -> str:
    from components.models.builders import build_vlm

    build_vlm(str(ROOT / "components/models/presets/tiny.yaml"), QUICKSTART_LLM).save_pretrained(folder)
    return folder


def requests_for(n: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"volume": rng.random((1, 32, 64, 64), dtype=np.float32),
             "sample": {"task": "vqa_open", "question": QUESTIONS[i % len(QUESTIONS)], "answer": ""}}
            for i in range(n)]


def deploy(model_dir: str, max_batch_size: int, max_new_tokens: int):
    """The evaluation app with ``max_batch_size``; returns the handle of its VolumeVLM deployment."""
    from ray import serve

    from components.config import from_dict
    from ray_jobs.evaluate import EvaluateConfig
    from ray_jobs.serve_app import vlm_app

    cfg = from_dict(EvaluateConfig, {
        "model": model_dir, "batch": False, "generation": {"max_new_tokens": max_new_tokens},
        "serve": {"max_batch_size": max_batch_size, "max_ongoing_requests": max(16, 2 * max_batch_size),
                  "batch_wait_timeout_s": 0.05, "cpus_per_replica": 1.0}})
    app = f"bench-batch{max_batch_size}"
    serve.run(vlm_app(cfg, {"name": "quickstart", "size": [32, 64, 64]}), name=app, route_prefix=f"/{app}")
    return serve.get_deployment_handle("VolumeVLMServer", app)


def timed_round(handle, requests: list[dict]) -> dict:
    """Send every request at once; seconds, answers and the batch sizes the replica formed."""
    before = len(handle.info.remote().result()["batch_sizes"])
    start = time.perf_counter()
    answers = [r.result() for r in [handle.answer.remote(q) for q in requests]]
    seconds = time.perf_counter() - start
    sizes = handle.info.remote().result()["batch_sizes"][before:]
    return {"seconds": seconds, "answers": [a["prediction"] for a in answers], "batch_sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="text pairs for the metric comparison")
    parser.add_argument("--requests", type=int, default=64, help="requests for the Serve comparison")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (alternating)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-metrics", action="store_true", help="run only the Serve comparison")
    args = parser.parse_args()

    figures = {}
    if not args.skip_metrics:
        from benchmarks.eval_metrics import compare

        print("== (a) metric suite vs reference implementations, one pair at a time")
        figures["metrics"] = compare(args.pairs, args.seed)

    print(f"\n== (b) Serve throughput: max_batch_size={args.batch} vs 1, {args.requests} concurrent requests")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}})
    from ray import serve

    serve.start(proxy_location="Disabled")  # handles only: no HTTP needed here
    with tempfile.TemporaryDirectory(prefix="radray-bench-") as folder:
        model_dir = build_model(os.path.join(folder, "model"))
        requests = requests_for(args.requests, args.seed)
        # both apps up side by side (one CPU each); rounds alternate between them so that load
        # from other work on a shared machine falls on both alike
        modes = {args.batch: deploy(model_dir, args.batch, args.max_new_tokens),
                 1: deploy(model_dir, 1, args.max_new_tokens)}
        for handle in modes.values():
            timed_round(handle, requests[:args.batch])  # warm-up
        rounds: dict[int, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, handle in modes.items():
                rounds[mode].append(timed_round(handle, requests))
    serve.shutdown()
    ray.shutdown()
    print(f"{'max_batch_size':<16}{'best s':>8}{'median s':>10}{'req/s (best)':>14}{'mean batch':>12}{'max batch':>11}")
    best = {}
    for mode, runs in rounds.items():
        times = sorted(r["seconds"] for r in runs)
        sizes = [b for r in runs for b in r["batch_sizes"]]
        best[mode] = times[0]
        print(f"{mode:<16}{times[0]:>8.2f}{times[len(times) // 2]:>10.2f}{len(requests) / times[0]:>14.2f}"
              f"{sum(sizes) / len(sizes):>12.2f}{max(sizes):>11}")
    print(f"throughput ratio (batched / max_batch_size=1), best of {args.rounds} rounds: {best[1] / best[args.batch]:.2f}x")
    same = sum(a == b for a, b in zip(rounds[args.batch][0]["answers"], rounds[1][0]["answers"]))
    print(f"identical greedy answers: {same}/{len(requests)} (batched prompts are left-padded)")
    if "metrics" in figures:
        m = figures["metrics"]
        print(f"metric suite speed-up: {m['speedup']:.2f}x, max abs difference {m['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
