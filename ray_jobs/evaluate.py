"""Batch evaluation and online inference through one Ray Serve application.

    python -m ray_jobs.evaluate --config ray_jobs/configs/evaluate/phantom.yaml [key.sub=value ...]

A Ray Data stream of the split's samples (volumes joined with their samples) is sent concurrently
to the VolumeVLM deployment, which batches the requests (``@serve.batch``); the text metrics run
batched in the scorer deployment. Output under ``output``:

  predictions.parquet / .csv   one row per sample: the sample, the prediction, per-sample metrics,
                               TG-IS slice scores (models with a 2D branch)
  retrieval_embeddings.parquet with ``retrieval.model``: each volume/report pair and its two embeddings
  results/<run>.json           averaged results with every generation and metric setting
  tables/                      paper-style Markdown + CSV tables and PNG charts
  summary.json                 paths and headline numbers

With ``retrieval.model`` (a contrastive checkpoint) the split's volumes and reports are embedded on a
Ray Data actor pool first and image-text retrieval R@K (Med3DVLM Table 1) joins the results; with
``model: null`` only that runs, without Serve.

The same application answers HTTP on ``serve.host:serve.port``: ``POST /answer?question=...`` with
a NIfTI, zipped DICOM series or .npy volume as the body (README, "Online inference").
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from components.config import ConfigError, parse_cli, to_dict
from components.data.preprocess import get_spec
from components.data.storage import StorageConfig, is_remote, join, open_fs, write_bytes
from components.evaluation.data import (EVAL_TASKS, image_sources, read_samples, read_spec, read_volumes,
                                         volume_shards)
from components.evaluation.retrieval import write_embeddings
from components.evaluation.score import score
from components.metrics.bertscore import BertScoreSettings
from components.metrics.results import GenerationSettings, run_result, save_result
from components.metrics.tables import write_tables
from ray_jobs.common import RayConfig, init_ray
from ray_jobs.retrieval_stream import RetrievalSection, embed_split

Task = Literal["caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis"]


@dataclass
class ServeSection:
    """The VolumeVLM deployment and its HTTP endpoint."""

    max_batch_size: int = 8
    """Requests generated together (``@serve.batch``)."""
    batch_wait_timeout_s: float = 0.05
    """How long a batch waits to fill before it runs anyway."""
    max_ongoing_requests: int = 16
    """Requests a replica accepts at once; must be >= max_batch_size, otherwise batches stay small."""
    num_replicas: int = 1
    """Model replicas."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per replica (also its torch thread count, at least 1)."""
    gpus_per_replica: float = 0.0
    """GPUs per replica; > 0 runs the model on CUDA."""
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = 8000
    """HTTP port."""
    max_upload_mb: float = 512.0
    """Largest accepted upload body; larger ones get 413."""
    max_volume_mb: float = 4096.0
    """Largest voxel data an upload may unpack to (header or zip sizes are checked before reading)."""
    app_name: str = "radray-eval"
    """Serve application name (the scorer runs as ``<app_name>-scorer``)."""
    shutdown_after: bool = True
    """Shut Serve down when the batch evaluation is written; false keeps HTTP answering (the command
    line then waits for Ctrl-C)."""

    def __post_init__(self):
        if self.max_batch_size < 1 or self.num_replicas < 1:
            raise ValueError("max_batch_size and num_replicas must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): a replica never holds enough requests to fill larger batches")


@dataclass
class ScorerSection:
    """The text-metric (BERTScore) deployment."""

    max_batch_size: int = 64
    """Pairs scored together: the evaluation sends them to the scorer in chunks of this many."""
    cpus: float = 0.5
    """CPUs reserved for the scorer."""
    gpus: float = 0.0
    """GPUs for the scorer (set bertscore.device to cuda too)."""

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")


@dataclass
class StreamSection:
    """The Ray Data stream that sends the samples to the model."""

    batch_size: int = 16
    """Samples per Ray Data batch; each batch's requests are sent all at once."""
    concurrency: int = 2
    """Actors sending batches in parallel (requests in flight <= batch_size x concurrency)."""


@dataclass
class EvaluateConfig:
    """Batch evaluation of one split through Ray Serve, image-text retrieval, and online inference."""

    model: str | None = None
    """Model folder, checkpoint (with ``model/``) or training run folder (newest checkpoint); local or s3://.
    null = no VLM (a retrieval-only run: set ``retrieval.model``)."""
    data_path: str = "data/preprocessed/phantom-quickstart"
    """Preprocessed data (``ray_jobs.preprocess`` output), local or s3://."""
    split: str = "test"
    """Split evaluated."""
    tasks: list[Task] = field(default_factory=lambda: list(EVAL_TASKS))
    """Tasks evaluated."""
    limit: int | None = None
    """Evaluate only the first N samples of each task."""
    images: Literal["real", "zeros", "shuffled"] = "real"
    """Volumes shown: each sample's own, all-zero ones, or another sample's (a blind-model check)."""
    image_seed: int = 0
    """Seed of the ``shuffled`` permutation."""
    spec: str | dict | None = None
    """Preprocessing spec for uploads; None = the one in data_path's summary.json (the training data's)."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding settings (greedy by default), recorded in the results."""
    bertscore: BertScoreSettings = field(default_factory=BertScoreSettings)
    """BERTScore model and settings (offline default: the packaged MiniLM)."""
    output: str = "results/eval"
    """Output folder, local or s3://."""
    run: str | None = None
    """Row label in the tables; None = the model folder's name and the image condition."""
    dataset: str | None = None
    """Dataset name in the results; None = data_path's folder name."""
    batch: bool = True
    """Run the batch evaluation; false only serves HTTP."""
    serve: ServeSection = field(default_factory=ServeSection)
    """Model deployment and HTTP."""
    scorer: ScorerSection = field(default_factory=ScorerSection)
    """Text-metric deployment."""
    stream: StreamSection = field(default_factory=StreamSection)
    """Request stream."""
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    """Image-text retrieval with a contrastive checkpoint (Med3DVLM Table 1); off while ``retrieval.model`` is null."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint and credentials (empty = the environment's)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def __post_init__(self):
        if self.spec is not None:
            try:
                get_spec(self.spec)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"spec: {e}") from None
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")
        if self.model is None and (self.retrieval.model is None or not self.batch):
            raise ConfigError("model: required, unless retrieval.model is set and batch is true (a retrieval-only run)")


# --- the request stream ---------------------------------------------------------------------------

class SamplesFromShards:
    """Ray Data UDF: volume shard files -> one row per sample shown one of their volumes under the
    image condition."""

    def __init__(self, samples: list[dict], images: str, seed: int, data_path: str, storage: dict):
        sources = image_sources([s["volume_id"] for s in samples], images, seed)
        self.by_shown: dict[str, list[dict]] = {}
        for order, s in enumerate(samples):
            shown = sources[s["volume_id"]]
            self.by_shown.setdefault(shown, []).append({**s, "image_volume_id": shown, "order": order})
        self.zeros = images == "zeros"
        self.data_path, self.storage = data_path, storage

    def __call__(self, batch: dict) -> dict:
        volumes = read_volumes(self.data_path, self.by_shown, storage=self.storage, shards=list(batch["path"]))
        arrays, recs = [], []
        for vid, volume in volumes.items():
            for rec in self.by_shown[vid]:
                arrays.append(np.zeros_like(volume) if self.zeros else volume)
                recs.append(rec)
        # every shard holds a wanted volume (volume_shards picks them), so the batch is never empty
        return {"volume": np.stack(arrays),
                "sample_json": np.array([json.dumps(r) for r in recs], dtype=object)}


class AskVolumeVLM:
    """Ray Data UDF: sends a batch of rows to the VolumeVLM deployment at once, returns its answers."""

    def __init__(self, app_name: str):
        from ray import serve

        self.handle = serve.get_deployment_handle("VolumeVLMServer", app_name)

    def __call__(self, batch: dict) -> dict:
        responses = [self.handle.answer.remote({"volume": v, "sample": json.loads(s)})
                     for v, s in zip(batch["volume"], batch["sample_json"])]
        outs = [r.result() for r in responses]
        return {"sample_json": batch["sample_json"],
                "prediction": np.array([o["prediction"] for o in outs], dtype=object),
                "truncated": np.array([o["truncated"] for o in outs], dtype=bool),
                "slice_scores_json": np.array([json.dumps(o["slice_scores"]) for o in outs], dtype=object)}


def stream_predictions(cfg: EvaluateConfig, samples: list[dict], storage: dict) -> list[dict]:
    """Every sample with its ``prediction`` (and ``slice_scores``), in the samples' order."""
    import ray
    from ray.data import ActorPoolStrategy

    # the shard files are listed here and read by a UDF: read_parquet's file listing wants a whole
    # free CPU, which the replicas hold on a small machine
    paths = volume_shards(cfg.data_path, {s["volume_id"] for s in samples}, storage)
    shards = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    rows = shards.map_batches(SamplesFromShards, fn_constructor_kwargs=dict(
        samples=samples, images=cfg.images, seed=cfg.image_seed, data_path=cfg.data_path, storage=storage),
        batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=1), num_cpus=0.25)
    # num_cpus=0: these actors only move rows and wait on Serve; the CPUs belong to the replicas
    answered = rows.map_batches(AskVolumeVLM, fn_constructor_kwargs=dict(app_name=cfg.serve.app_name),
                                batch_size=cfg.stream.batch_size, batch_format="numpy",
                                compute=ActorPoolStrategy(size=cfg.stream.concurrency), num_cpus=0)
    records = []
    for row in answered.iter_rows():
        sample = json.loads(row["sample_json"])
        records.append({**sample, "prediction": row["prediction"], "truncated": bool(row["truncated"]),
                        "slice_scores": json.loads(row["slice_scores_json"])})
    if len(records) != len(samples):
        raise RuntimeError(f"{len(samples)} samples sent, {len(records)} answered")
    return [{k: v for k, v in r.items() if k != "order"} for r in sorted(records, key=lambda r: r["order"])]


# --- outputs --------------------------------------------------------------------------------------

def _write_rows(rows: list[dict], folder: str) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    # tasks carry different metric columns; from_pylist would take the first row's keys only
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in columns} for r in rows]
    parquet = os.path.join(folder, "predictions.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    # CSV has no lists: slice scores go in as JSON text
    flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    csv = os.path.join(folder, "predictions.csv")
    pacsv.write_csv(pa.Table.from_pylist(flat), csv)
    return parquet, csv


def headline(result: dict) -> dict:
    """Micro averages per task, recalls for retrieval (the figures to print)."""
    return {t["task"]: {"n": t.get("n_samples"),
                        **(t["micro"] if "micro" in t else {d: t[d] for d in ("image_to_text", "text_to_image")})}
            for t in result["tasks"]}


def write_outputs(cfg: EvaluateConfig, rows: list[dict], result: dict, storage: dict,
                  retrieval: dict | None = None) -> dict:
    """Predictions (when a VLM ran), retrieval embeddings (when retrieval ran), results JSON and tables
    into ``cfg.output``; returns their paths there."""
    remote = is_remote(cfg.output)
    folder = tempfile.mkdtemp(prefix="radray-eval-") if remote else os.path.abspath(cfg.output)
    os.makedirs(folder, exist_ok=True)
    save_result(result, os.path.join(folder, "results", f"{result['run']}.json"))
    write_tables([result], os.path.join(folder, "tables"))
    base = cfg.output.rstrip("/") if remote else folder
    paths = {"output": base, "results": join(base, "results", f"{result['run']}.json"), "tables": join(base, "tables"),
             "tables_markdown": join(base, "tables", "tables.md")}
    if rows:
        _write_rows(rows, folder)
        paths.update(predictions=join(base, "predictions.parquet"), predictions_csv=join(base, "predictions.csv"))
    if retrieval:
        write_embeddings(os.path.join(folder, "retrieval_embeddings.parquet"), retrieval["pairs"],
                         retrieval["image_embeddings"], retrieval["text_embeddings"])
        paths["retrieval_embeddings"] = join(base, "retrieval_embeddings.parquet")
    if remote:
        fs, path = open_fs(cfg.output, storage)
        fs.put(folder.rstrip("/") + "/", path, recursive=True)
        shutil.rmtree(folder, ignore_errors=True)
    return paths


# --- the job --------------------------------------------------------------------------------------

def _absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)  # replicas run in another directory


def serve_and_generate(cfg: EvaluateConfig, dataset: str, storage: dict, summary: dict) -> tuple[list[dict], dict | None]:
    """Deploy the VLM (and, for a batch run, the scorer); with ``batch``, stream the split through it and
    score. Returns ``(per-sample rows, results dict)``, or ``([], None)`` without ``batch``."""
    from ray import serve

    from ray_jobs.serve_app import ServeTextScorer, scorer_app, vlm_app

    spec = to_dict(get_spec(cfg.spec if cfg.spec is not None else read_spec(cfg.data_path, storage)))
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    t0 = time.time()
    targets = [serve.RunTarget(vlm_app(cfg, spec), name=s.app_name, route_prefix="/")]
    if cfg.batch:
        targets.append(serve.RunTarget(scorer_app(cfg), name=f"{s.app_name}-scorer", route_prefix=None))
    serve.run_many(targets)  # side by side: the VLM and the BERTScore model load at the same time
    url = f"http://{s.host}:{s.port}/answer"
    summary.update({"url": url, "deploy_seconds": round(time.time() - t0, 1)})
    print(f"[evaluate] {s.app_name}: {s.num_replicas} replica(s) of {cfg.model}, max_batch_size {s.max_batch_size}; "
          f"online inference at {url}", flush=True)
    if not cfg.batch:
        return [], None
    samples = read_samples(cfg.data_path, cfg.split, cfg.tasks, cfg.limit, storage)
    if not samples:
        raise ValueError(f"{cfg.data_path}: no samples in split {cfg.split!r} for tasks {cfg.tasks}")
    t0 = time.time()
    records = stream_predictions(cfg, samples, storage)
    generate_s = time.time() - t0
    info = serve.get_deployment_handle("VolumeVLMServer", s.app_name).info.remote().result()
    rows, result = score(records, dataset=dataset, split=cfg.split,
                         run=cfg.run or f"{os.path.basename(cfg.model.rstrip('/'))}-{cfg.images}",
                         generation=cfg.generation,
                         model={**info["model"], "images": cfg.images, "image_seed": cfg.image_seed},
                         text_scorer=ServeTextScorer(serve.get_deployment_handle("TextScorerServer", f"{s.app_name}-scorer"),
                                                     cfg.scorer.max_batch_size))
    summary.update({"n_samples": len(rows), "generate_seconds": round(generate_s, 1),
                    "samples_per_second": round(len(rows) / generate_s, 2), "batch_sizes": info["batch_sizes"]})
    print(f"[evaluate] {len(rows)} samples in {generate_s:.1f} s", flush=True)
    for t in result["tasks"]:
        if t.get("truncated"):
            print(f"[evaluate] warning: {t['truncated']} of {t['n_samples']} {t['task']} predictions reached "
                  f"generation.max_new_tokens={cfg.generation.max_new_tokens} before ending: they are cut off "
                  "and score lower than the model would; raise max_new_tokens", flush=True)
    return rows, result


def run(cfg: EvaluateConfig) -> dict:
    """Retrieval (with ``retrieval.model``), then deploy and evaluate the split through Serve (with
    ``model``), write the outputs; returns paths and headline numbers."""
    init_ray(cfg.ray)
    storage = to_dict(cfg.storage)
    cfg.data_path = _absolute(cfg.data_path)
    dataset = cfg.dataset or os.path.basename(cfg.data_path.rstrip("/"))
    summary: dict = {}
    retrieval = None
    if cfg.batch and cfg.retrieval.model is not None:
        cfg.retrieval.model = _absolute(cfg.retrieval.model)
        t0 = time.time()
        # before Serve deploys: the embedding actors get the CPUs that the replicas hold afterwards
        retrieval = embed_split(cfg.retrieval, cfg.data_path, cfg.split, dataset, storage)
        summary["retrieval_seconds"] = round(time.time() - t0, 1)
        print(f"[evaluate] retrieval: {len(retrieval['pairs'])} volume/report pairs embedded with "
              f"{cfg.retrieval.model} in {summary['retrieval_seconds']} s", flush=True)
    rows, result = [], None
    if cfg.model is not None:
        cfg.model = _absolute(cfg.model)
        rows, result = serve_and_generate(cfg, dataset, storage, summary)
    if cfg.batch:
        if result is None:  # retrieval only
            result = run_result(cfg.run or os.path.basename(cfg.retrieval.model.rstrip("/")), [],
                                model={"retrieval": cfg.retrieval.model})
        if retrieval is not None:
            result["tasks"].append(retrieval["result"])
        summary.update(write_outputs(cfg, rows, result, storage, retrieval))
        summary.update({"run": result["run"], "headline": headline(result)})
        write_bytes(join(summary["output"], "summary.json"), json.dumps(summary, indent=1).encode(), storage)
        print(f"[evaluate] tables in {summary['tables']}", flush=True)
    if cfg.model is not None and cfg.serve.shutdown_after:
        from ray import serve

        serve.shutdown()
    return summary


def main(argv=None):
    cfg = parse_cli(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "batch_sizes"}, indent=1))
    if cfg.batch and not is_remote(cfg.output):
        with open(summary["tables_markdown"], encoding="utf-8") as f:
            print(f.read())
    if cfg.model is not None and not cfg.serve.shutdown_after:
        from ray import serve

        print(f"[evaluate] serving {summary['url']}; Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a process manager's stop shuts down like Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
