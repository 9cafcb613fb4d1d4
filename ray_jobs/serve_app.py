"""The Ray Serve application of the evaluation: one VolumeVLM deployment answering both the batch
evaluation stream and HTTP uploads, and a text-metric scorer deployment.

    VolumeVLMServer   the model; ``answer`` is ``@serve.batch``ed, so concurrent requests from the
                      Ray Data stream and from HTTP are generated together
    InferenceAPI      HTTP ingress: checks and preprocesses an uploaded volume, asks VolumeVLMServer
    TextScorerServer  BLEU-1 / ROUGE-1 / METEOR / BERTScore of chunks of pairs, so BERTScore embeds
                      many sentences per forward pass (a separate application, no HTTP route)
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from ray import serve
from starlette.datastructures import MultiDict, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse

from components.config import to_dict
from components.data.prompts import format_sample
from components.evaluation.predict import load_model, model_info, predict
from components.evaluation.upload import UploadError, volume_from_upload
from components.metrics.bertscore import BertScoreSettings
from components.metrics.results import GenerationSettings
from components.metrics.text import TextMetricResult, TextMetricSettings, TextMetricSuite

ONLINE_TASKS = ("vqa_open", "vqa_closed", "vqa_yn", "caption")


@serve.deployment
class VolumeVLMServer:
    """A ``VolumeVLM`` loaded from a model/checkpoint/run folder (local or s3://)."""

    def __init__(self, model_path: str, storage: dict, generation: dict, max_batch_size: int,
                 batch_wait_timeout_s: float, torch_threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, storage, device)
        self.source = model_path
        self.settings = GenerationSettings(**generation)
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def answer(self, requests: list[dict]) -> list[dict]:
        """Each request: ``{"volume": (1, D, H, W) array, "sample": sample record}``."""
        self.batch_sizes.append(len(requests))
        # generation runs in a thread so the replica keeps accepting requests meanwhile: the next
        # batch is already queued when this one ends (blocking the event loop halved batch sizes)
        return await asyncio.to_thread(predict, self.model, [r["volume"] for r in requests],
                                       [r["sample"] for r in requests], self.settings, len(requests))

    def info(self) -> dict:
        """The model description and the batch sizes formed so far (for checking batching works)."""
        return {"model": model_info(self.model, self.source), "generation": self.settings.to_dict(),
                "batch_sizes": list(self.batch_sizes)}


def _sample_from_params(params: MultiDict) -> dict:
    """The sample record an HTTP request asks about, formatted later exactly as training formats it."""
    task = params.get("task", "vqa_open")
    if task not in ONLINE_TASKS:
        raise UploadError(400, f"task must be one of {ONLINE_TASKS}, got {task!r}")
    question = params.get("question", "")
    if task != "caption" and not question.strip():
        raise UploadError(400, "missing ?question=... (only task=caption needs none)")
    choices = params.getlist("choice")
    if task == "vqa_closed" and not 2 <= len(choices) <= 4:
        raise UploadError(400, "task=vqa_closed needs 2-4 &choice=... parameters (options A-D in order)")
    return {"task": task, "question": question, "choices": choices, "answer": "", "answer_choice": ""}


@serve.deployment
class InferenceAPI:
    """HTTP: ``POST /answer?question=...`` with the volume as the body, or as a multipart form's
    ``volume`` file whose other fields count as query parameters; ``GET /health``."""

    def __init__(self, vlm, spec: dict, max_upload_bytes: int, max_voxel_bytes: int):
        self.vlm, self.spec = vlm, spec
        self.max_upload_bytes, self.max_voxel_bytes = max_upload_bytes, max_voxel_bytes

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path == "health":
            return JSONResponse({"status": "ok", "spec": self.spec, "max_upload_bytes": self.max_upload_bytes,
                                 **(await self.vlm.info.remote())})
        if request.method != "POST" or path != "answer":
            return JSONResponse({"error": "POST /answer?question=... with the volume as the body, or GET /health"},
                                status_code=404)
        try:
            return JSONResponse(await self._answer(request))
        except UploadError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # still an answer the client can read; the server stays up either way
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise UploadError(413, f"upload of {int(declared)} bytes is above the {self.max_upload_bytes} byte limit")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a missing length header is no way around the limit
            body += chunk
            if len(body) > self.max_upload_bytes:
                raise UploadError(413, f"upload is above the {self.max_upload_bytes} byte limit")
        return bytes(body)

    async def _read_upload(self, request: Request) -> tuple[bytes, MultiDict]:
        """The volume's bytes and the request's parameters (the query's, and a form's text fields)."""
        body = await self._read_body(request)  # the whole request counts against the upload limit
        params = list(request.query_params.multi_items())
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return body, MultiDict(params)

        async def stream():
            yield body
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=32).parse()
        except MultiPartException as e:
            raise UploadError(400, f"unreadable multipart form: {e}") from e
        volume = form.get("volume")
        if not isinstance(volume, UploadFile):
            raise UploadError(400, "a multipart upload needs the volume as a file field named 'volume'")
        params += [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        data = await volume.read()
        await form.close()
        return data, MultiDict(params)

    async def _answer(self, request: Request) -> dict:
        start = time.perf_counter()
        data, params = await self._read_upload(request)
        sample = _sample_from_params(params)
        # reading and resampling a volume takes CPU seconds: off the event loop, so the ingress keeps answering
        volume = await asyncio.to_thread(volume_from_upload, data, self.spec, self.max_voxel_bytes)
        out = await self.vlm.answer.remote({"volume": volume, "sample": sample})
        reply = {"answer": out["prediction"], "truncated": out["truncated"], "prompt": format_sample(sample)[0],
                 "task": sample["task"],
                 "volume_shape": list(volume.shape), "spec": self.spec.get("name"),
                 "seconds": round(time.perf_counter() - start, 3)}
        if out["slice_scores"] is not None:
            reply["slice_scores"] = out["slice_scores"]
        return reply


@serve.deployment
class TextScorerServer:
    """The text metrics of (prediction, reference) pairs, a chunk of pairs per request."""

    def __init__(self, bertscore: dict):
        self.suite = TextMetricSuite(TextMetricSettings(bertscore=BertScoreSettings(**bertscore)))
        self.lock = asyncio.Lock()

    async def score(self, pairs: list[tuple[str, str]]) -> list[dict]:
        # one chunk at a time: concurrent chunks would only share the same CPUs
        async with self.lock:
            result = await asyncio.to_thread(self.suite.compute, [p for p, _ in pairs], [r for _, r in pairs])
        return [{name: values[i] for name, values in result.per_sample.items()} for i in range(len(pairs))]

    def describe(self) -> dict:
        return self.suite.describe()


class ServeTextScorer:
    """:class:`components.evaluation.score.TextScorer` backed by the scorer deployment. Pairs go in
    chunks of ``pairs_per_request``: 812 pairs (the quickstart's count) take 13x as long as in one
    process when sent one per request, 2.9x in chunks of 64 (``benchmarks/serve_scoring.py``, 2 cores). Per-pair
    values do not depend on the chunk (``components.metrics.bertscore`` matches per pair)."""

    def __init__(self, handle, pairs_per_request: int):
        self.handle, self.pairs_per_request = handle, pairs_per_request

    def compute(self, predictions, references) -> TextMetricResult:
        pairs, n = list(zip(predictions, references)), self.pairs_per_request
        responses = [self.handle.score.remote(pairs[i:i + n]) for i in range(0, len(pairs), n)]
        values = [v for response in responses for v in response.result()]
        names = list(values[0]) if values else []
        per_sample = {name: [v[name] for v in values] for name in names}
        mean = {name: sum(v) / len(v) for name, v in per_sample.items()}
        return TextMetricResult(per_sample=per_sample, mean=mean, settings=self.handle.describe.remote().result())


def vlm_app(cfg, spec: dict):
    """The application: HTTP ingress bound to the VolumeVLM deployment, sized from ``cfg.serve``."""
    s = cfg.serve
    # a batch evaluation sends every sample as a request: an access log line each would bury the progress
    logs = {"enable_access_log": not cfg.batch}
    vlm = VolumeVLMServer.options(
        num_replicas=s.num_replicas, max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}, logging_config=logs,
    ).bind(cfg.model, to_dict(cfg.storage), asdict(cfg.generation), s.max_batch_size, s.batch_wait_timeout_s,
           max(1, int(s.cpus_per_replica)), s.gpus_per_replica > 0)
    api = InferenceAPI.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(100, s.max_ongoing_requests),
                               logging_config=logs)
    return api.bind(vlm, spec, int(s.max_upload_mb * 1024**2), int(s.max_volume_mb * 1024**2))


def scorer_app(cfg):
    s = cfg.scorer
    return TextScorerServer.options(
        max_ongoing_requests=100, ray_actor_options={"num_cpus": s.cpus, "num_gpus": s.gpus},
        logging_config={"enable_access_log": False},  # only a batch evaluation calls it
    ).bind(asdict(cfg.bertscore))

