"""Evaluation speed, each against its baseline in the same process.

    python -m benchmarks.eval_throughput [--pairs 2000] [--requests 64] [--batch 8] [--skip-metrics]

(a) The text-metric suite on ``--pairs`` synthetic pairs vs the reference implementations called one
    pair at a time (``benchmarks.eval_metrics``): times, ratio, largest difference.
(b) Ray Serve throughput of the evaluation's VolumeVLM deployment (``ray_jobs.serve_app``) with
    dynamic batching (``max_batch_size=--batch``) vs ``max_batch_size=1``: the same application and
    the same ``--requests`` requests (fixed-seed volumes and questions) sent at once, on a local
    Ray with 2 CPUs. The model is the quickstart's shape (tiny 3D ViT, conv3d perceiver, 2-layer LLM
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


def serve_throughput(model_dir: str, requests: list[dict], max_batch_size: int, max_new_tokens: int) -> dict:
    """Deploy the evaluation app with ``max_batch_size``, send every request at once, time the answers."""
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
    handle = serve.get_deployment_handle("VolumeVLMServer", app)
    for r in [handle.answer.remote(q) for q in requests[:max_batch_size]]:  # warm-up: first calls compile kernels
        r.result()
    warm = len(handle.info.remote().result()["batch_sizes"])
    start = time.perf_counter()
    answers = [r.result() for r in [handle.answer.remote(q) for q in requests]]
    seconds = time.perf_counter() - start
    sizes = handle.info.remote().result()["batch_sizes"][warm:]
    serve.delete(app)
    return {"seconds": seconds, "per_second": len(requests) / seconds, "answers": [a["prediction"] for a in answers],
            "mean_batch": sum(sizes) / len(sizes), "max_batch": max(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="text pairs for the metric comparison")
    parser.add_argument("--requests", type=int, default=64, help="requests for the Serve comparison")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=16)
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
        batched = serve_throughput(model_dir, requests, args.batch, args.max_new_tokens)
        single = serve_throughput(model_dir, requests, 1, args.max_new_tokens)
    serve.shutdown()
    ray.shutdown()
    same = sum(a == b for a, b in zip(batched["answers"], single["answers"]))
    print(f"{'max_batch_size':<16}{'seconds':>9}{'req/s':>8}{'mean batch':>12}{'max batch':>11}")
    for name, run in ((str(args.batch), batched), ("1", single)):
        print(f"{name:<16}{run['seconds']:>9.2f}{run['per_second']:>8.2f}{run['mean_batch']:>12.2f}{run['max_batch']:>11}")
    print(f"throughput ratio (batched / single): {batched['per_second'] / single['per_second']:.2f}x")
    print(f"identical greedy answers: {same}/{len(requests)} (batched prompts are left-padded)")
    if "metrics" in figures:
        m = figures["metrics"]
        print(f"metric suite speed-up: {m['speedup']:.2f}x, max abs difference {m['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
