"""Evaluation through Ray Serve on the small phantom: batch run outputs, HTTP answers with TG-IS slice
scores, refused uploads, and the in-process evaluation's image conditions. One Ray and one Serve
application for the whole module."""
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, start_local_ray

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PRESETS = Path(__file__).resolve().parents[1] / "components" / "models" / "presets"
# SmolLM2's tokenizer on a 2-layer LLM; untied embeddings so an untrained model writes varied tokens
TINY_LLM = ["llm.source=config",
            "llm.config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 49152, max_position_embeddings: 512, "
            "tie_word_embeddings: false}"]
TASKS = ("caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis")
SLICES = 32  # the quickstart spec's depth; TG-IS scores every slice


@pytest.fixture(scope="module")
def tgis_model(tmp_path_factory):
    """A tiny Med-2E3-style model (3D ViT + per-slice 2D encoder + TG-IS), saved as a model folder."""
    from components.models.builders import build_vlm

    model = build_vlm(str(PRESETS / "tiny_2e3.yaml"), TINY_LLM)
    path = tmp_path_factory.mktemp("tgis") / "model"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def served(train_shards, tgis_model, tmp_path_factory):
    """The batch evaluation through Serve (2 samples per task), with the application left answering HTTP."""
    from components.config import from_dict
    from ray_jobs.evaluate import EvaluateConfig, run

    start_local_ray()
    cfg = from_dict(EvaluateConfig, {
        "model": tgis_model, "data_path": train_shards, "limit": 2, "run": "tiny-tgis",
        "output": str(tmp_path_factory.mktemp("eval")), "generation": {"max_new_tokens": 4},
        "serve": {"port": free_port(), "max_batch_size": 4, "max_ongoing_requests": 8, "batch_wait_timeout_s": 0.2,
                  "max_upload_mb": 3.0, "shutdown_after": False},
        "scorer": {"cpus": 0.25}, "stream": {"batch_size": 8, "concurrency": 1}})
    summary = run(cfg)
    yield cfg, summary
    from ray import serve

    serve.shutdown()


def _post(url: str, body: bytes, **query) -> tuple[int, dict]:
    from urllib.parse import urlencode

    request = urllib.request.Request(f"{url}?{urlencode(query, doseq=True)}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_evaluation_writes_predictions_results_and_tables(served):
    import pyarrow.parquet as pq

    from components.metrics.results import load_results

    cfg, summary = served
    rows = pq.read_table(summary["predictions"]).to_pylist()
    assert {r["task"] for r in rows} == set(TASKS)
    assert len(rows) == summary["n_samples"] <= 2 * len(TASKS)
    assert all(r["prediction"] for r in rows), "an untrained model with untied embeddings still writes tokens"
    assert all(len(r["slice_scores"]) == SLICES and abs(sum(r["slice_scores"]) - 1) < 1e-4 for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if r["task"] in ("vqa_closed", "vqa_yn", "diagnosis"))
    assert all(r["bertscore_f1"] is not None for r in rows if r["task"] in ("caption", "vqa_open"))
    with open(summary["predictions_csv"], encoding="utf-8") as f:
        assert sum(1 for _ in f) == len(rows) + 1

    result, = load_results([summary["results"]])
    assert result["generation"]["do_sample"] is False and result["generation"]["max_new_tokens"] == 4
    assert {t["task"] for t in result["tasks"]} == set(TASKS)
    caption = next(t for t in result["tasks"] if t["task"] == "caption")
    assert caption["settings"]["bertscore"]["model_name"].startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert result["model"]["fusion"] == "tgis" and result["model"]["images"] == "real"

    dataset = os.path.basename(cfg.data_path)
    tables = {"caption_text_metrics", "vqa_open_text_metrics", f"vqa_macro_micro__{dataset}",
              f"vqa_open_per_type__{dataset}", f"vqa_closed_per_type__{dataset}", f"vqa_yn_per_type__{dataset}",
              f"diagnosis__{dataset}"}
    written = set(os.listdir(summary["tables"]))
    assert {f"{name}{ext}" for name in tables for ext in (".md", ".csv", ".png")} | {"tables.md"} <= written
    # dynamic batching formed batches larger than one request
    assert max(summary["batch_sizes"]) > 1


def _nifti_bytes(phantom_dir: str) -> bytes:
    volumes = Path(phantom_dir) / "volumes"
    return next(iter(sorted(volumes.glob("*.nii.gz")))).read_bytes()


def _zipped_dicom(phantom_dir: str) -> bytes:
    series = next(p for p in sorted((Path(phantom_dir) / "volumes").iterdir()) if p.is_dir())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for f in sorted(series.rglob("*")):
            if f.is_file():
                archive.write(f, f.relative_to(series).as_posix())
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_http_answers_uploads_with_slice_scores(served, phantom_dir):
    cfg, summary = served
    uploads = {"nifti": _nifti_bytes(phantom_dir), "dicom_zip": _zipped_dicom(phantom_dir),
               "npy": _npy_bytes(np.random.default_rng(0).random((40, 48, 48), dtype=np.float32))}
    for name, body in uploads.items():
        status, reply = _post(summary["url"], body, question="Which organ shows a lesion?")
        assert status == 200, (name, reply)
        assert isinstance(reply["answer"], str) and reply["answer"]
        assert reply["volume_shape"] == [1, SLICES, 64, 64] and reply["spec"] == "quickstart"
        assert len(reply["slice_scores"]) == SLICES and abs(sum(reply["slice_scores"]) - 1) < 1e-4
    status, reply = _post(summary["url"], uploads["npy"], task="vqa_closed", question="Which plane?",
                          choice=["axial", "coronal", "sagittal", "oblique"])
    assert status == 200 and reply["prompt"].endswith("D. oblique")


def test_http_refuses_bad_uploads_and_keeps_answering(served):
    cfg, summary = served
    url = summary["url"]
    good = _npy_bytes(np.random.default_rng(1).random((32, 40, 40), dtype=np.float32))
    refused = {
        "bad bytes": (b"this is not a volume" * 10, 415),
        "2D array": (_npy_bytes(np.zeros((64, 64), np.float32)), 422),
        "4D array": (_npy_bytes(np.zeros((2, 8, 16, 16), np.float32)), 422),
        "truncated gzip": (b"\x1f\x8b" + b"\x00" * 64, 422),
        "broken zip": (b"PK\x03\x04" + b"\x00" * 64, 422),
        "too large": (b"\x93NUMPY" + b"\x00" * (4 * 1024**2), 413),
        "empty": (b"", 400),
    }
    for name, (body, expected) in refused.items():
        status, reply = _post(url, body, question="Is there a lesion?")
        assert status == expected, (name, status, reply)
        assert reply["error"], name
    status, reply = _post(url, good)  # no question
    assert status == 400 and "question" in reply["error"]
    status, reply = _post(url, good, question="Is there a lesion?")
    assert status == 200 and reply["answer"]
    with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_evaluate_split_image_conditions(tgis_model, train_shards):
    """zeros and shuffled show the model other volumes than real; the TG-IS slice scores are a
    fingerprint of what it saw, checked against predict() on the volumes each condition promises."""
    from components.evaluation import evaluate_split, load_model, predict, read_samples, read_volumes
    from components.metrics.results import GenerationSettings

    model = load_model(tgis_model)
    settings = GenerationSettings(max_new_tokens=2)
    runs = {images: evaluate_split(model, train_shards, tasks=("vqa_closed",), limit=6, images=images,
                                   settings=settings)["rows"] for images in ("real", "zeros", "shuffled")}
    samples = read_samples(train_shards, tasks=("vqa_closed",), limit=6)
    volumes = read_volumes(train_shards, {s["volume_id"] for s in samples})
    assert len(volumes) > 1 and [r["id"] for r in runs["shuffled"]] == [s["id"] for s in samples]
    shown = {"real": [volumes[s["volume_id"]] for s in samples],
             "zeros": [np.zeros_like(volumes[s["volume_id"]]) for s in samples],
             "shuffled": [volumes[r["image_volume_id"]] for r in runs["shuffled"]]}
    # shuffled: no sample is shown its own volume
    assert all(r["image_volume_id"] != r["volume_id"] for r in runs["shuffled"])
    for images, arrays in shown.items():
        expected = [o["slice_scores"] for o in predict(model, arrays, samples, settings)]
        assert all(np.allclose(r["slice_scores"], e, atol=1e-6) for r, e in zip(runs[images], expected)), images
    for images in ("zeros", "shuffled"):
        assert not any(np.allclose(a["slice_scores"], b["slice_scores"], atol=1e-6)
                       for a, b in zip(runs["real"], runs[images])), images


def test_config_refuses_batches_larger_than_ongoing_requests():
    from components.config import ConfigError, from_dict
    from ray_jobs.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        from_dict(EvaluateConfig, {"model": "m", "serve": {"max_batch_size": 16, "max_ongoing_requests": 8}})
    with pytest.raises(ConfigError, match="do_sample"):
        from_dict(EvaluateConfig, {"model": "m", "generation": {"do_sample": "false"}})
