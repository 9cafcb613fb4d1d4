"""Evaluation through Ray Serve on the small phantom: batch run outputs, HTTP answers with TG-IS slice
scores, refused uploads, the in-process evaluation's image conditions, and image-text retrieval with a
tiny SigLIP checkpoint. One Ray and one Serve application for the whole module."""
import io
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, start_local_ray

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PRESETS = Path(__file__).resolve().parents[1] / "components" / "models" / "presets"
CONFIGS = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs"
# SmolLM2's tokenizer on a 2-layer LLM; untied embeddings so an untrained model writes varied tokens
TINY_LLM = ["llm.source=config",
            "llm.config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 49152, max_position_embeddings: 512, "
            "tie_word_embeddings: false}"]
TASKS = ("caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis")
RETRIEVAL_SIZES = [2, 3, 100]  # the small phantom's test split has 3 volumes: 100 is skipped
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
def siglip_run(train_shards, tmp_path_factory):
    """A run folder of the CPU SigLIP recipe trained for 4 steps on the train split's reports, in this
    process (the training loop's local session writes checkpoints as Ray Train does)."""
    from components.config import load
    from components.evaluation import read_samples, read_volumes
    from components.training.loop import LocalSession, plan_steps, train
    from ray_jobs.pretrain_contrastive import ContrastiveJobConfig

    cfg = load(ContrastiveJobConfig, CONFIGS / "cpu" / "siglip.yaml",
               ["run.max_steps=4", "checkpoint.every_n_steps=4", "run.report_every_n_steps=2"])
    samples = read_samples(train_shards, "train", ("caption",))
    volumes = read_volumes(train_shards, {s["volume_id"] for s in samples})
    rows = [{"volume": volumes[s["volume_id"]], "answer": s["answer"]} for s in samples]
    run_dir = str(tmp_path_factory.mktemp("siglip") / "cpu-siglip")
    train(LocalSession(rows, run_dir), cfg, cfg.make_stage(), *plan_steps(cfg, len(rows), 1))
    return run_dir


@pytest.fixture(scope="module")
def served(train_shards, tgis_model, siglip_run, tmp_path_factory):
    """The batch evaluation through Serve (2 samples per task) with retrieval by the SigLIP run, with the
    application left answering HTTP."""
    from components.config import from_dict
    from ray_jobs.evaluate import EvaluateConfig, run

    start_local_ray()
    cfg = from_dict(EvaluateConfig, {
        "model": tgis_model, "data_path": train_shards, "limit": 2, "run": "tiny-tgis",
        "output": str(tmp_path_factory.mktemp("eval")), "generation": {"max_new_tokens": 4},
        "serve": {"port": free_port(), "max_batch_size": 4, "max_ongoing_requests": 8, "batch_wait_timeout_s": 0.2,
                  "max_upload_mb": 3.0, "shutdown_after": False},
        "scorer": {"cpus": 0.25}, "stream": {"batch_size": 8, "concurrency": 1},
        "retrieval": {"model": siglip_run, "sizes": RETRIEVAL_SIZES, "batch_size": 2, "cpus": 0.5}})
    summary = run(cfg)
    yield cfg, summary
    from ray import serve

    serve.shutdown()


def _post(url: str, body: bytes, headers: dict | None = None, **query) -> tuple[int, dict]:
    from urllib.parse import urlencode

    request = urllib.request.Request(f"{url}?{urlencode(query, doseq=True)}", data=body, method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post_form(url: str, volume: bytes, fields: dict, **query) -> tuple[int, dict]:
    """A multipart/form-data upload, as ``curl -F volume=@file -F key=value`` sends it."""
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata([*fields.items(), ("volume", ("ct.bin", volume))])
    return _post(url, body, {"Content-Type": content_type}, **query)


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
    assert all(isinstance(r["truncated"], bool) for r in rows)
    with open(summary["predictions_csv"], encoding="utf-8") as f:
        assert sum(1 for _ in f) == len(rows) + 1

    result, = load_results([summary["results"]])
    assert result["generation"]["do_sample"] is False and result["generation"]["max_new_tokens"] == 4
    assert {t["task"] for t in result["tasks"]} == {*TASKS, "retrieval"}
    # each task counts the predictions that max_new_tokens cut off
    assert all(t["truncated"] == sum(r["truncated"] for r in rows if r["task"] == t["task"])
               for t in result["tasks"] if t["task"] != "retrieval")
    caption = next(t for t in result["tasks"] if t["task"] == "caption")
    assert caption["settings"]["bertscore"]["model_name"].startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert result["model"]["fusion"] == "tgis" and result["model"]["images"] == "real"

    dataset = os.path.basename(cfg.data_path)
    tables = {"caption_text_metrics", "vqa_open_text_metrics", f"vqa_macro_micro__{dataset}",
              f"vqa_open_per_type__{dataset}", f"vqa_closed_per_type__{dataset}", f"vqa_yn_per_type__{dataset}",
              f"diagnosis__{dataset}", f"retrieval__{dataset}"}
    written = set(os.listdir(summary["tables"]))
    assert {f"{name}{ext}" for name in tables for ext in (".md", ".csv", ".png")} | {"tables.md"} <= written
    # dynamic batching formed batches larger than one request
    assert max(summary["batch_sizes"]) > 1


def test_a_batch_evaluation_writes_no_access_log_line_per_sample(served):
    import glob

    import ray

    cfg, summary = served
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    replicas = [f for d in ("VolumeVLMServer", "InferenceAPI", "TextScorerServer")
                for f in glob.glob(os.path.join(logs, f"replica_{cfg.serve.app_name}*_{d}_*.log"))]
    assert replicas, f"no replica logs of {cfg.serve.app_name} in {logs}"
    calls = [line for f in replicas for line in open(f, encoding="utf-8") if " -- CALL " in line]
    assert summary["n_samples"] > 0 and calls == []


def test_scorer_chunks_give_the_values_of_one_process(served):
    """The scorer deployment takes the pairs in chunks; every chunking gives each pair its own values."""
    import pyarrow.parquet as pq
    from ray import serve

    from components.metrics.text import TextMetricSettings, TextMetricSuite
    from ray_jobs.serve_app import ServeTextScorer

    cfg, summary = served
    rows = [r for r in pq.read_table(summary["predictions"]).to_pylist() if r["task"] in ("caption", "vqa_open")]
    predictions, references = [r["prediction"] for r in rows], [r["answer"] for r in rows]
    local = TextMetricSuite(TextMetricSettings(bertscore=cfg.bertscore)).compute(predictions, references)
    handle = serve.get_deployment_handle("TextScorerServer", f"{cfg.serve.app_name}-scorer")
    for chunk in (1, 3):
        served_values = ServeTextScorer(handle, chunk).compute(predictions, references)
        for name, values in local.per_sample.items():
            assert served_values.per_sample[name] == pytest.approx(values, abs=1e-5), (chunk, name)
            # the evaluation itself sent them in one chunk
            assert [r[name] for r in rows] == pytest.approx(values, abs=1e-5), name


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
        assert isinstance(reply["truncated"], bool)
    status, reply = _post(summary["url"], uploads["npy"], task="vqa_closed", question="Which plane?",
                          choice=["axial", "coronal", "sagittal", "oblique"])
    assert status == 200 and reply["prompt"].endswith("D. oblique")
    # the same upload as a multipart form (curl -F volume=@ct.nii.gz -F question=...): the same answer
    status, plain = _post(summary["url"], uploads["nifti"], question="Which organ shows a lesion?")
    status, form = _post_form(summary["url"], uploads["nifti"], {"question": "Which organ shows a lesion?"})
    assert status == 200 and form["answer"] == plain["answer"] and form["slice_scores"] == plain["slice_scores"]
    status, reply = _post_form(summary["url"], uploads["npy"], {"task": "vqa_closed", "question": "Which plane?"},
                               choice=["axial", "coronal", "sagittal", "oblique"])  # form fields and query together
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
    status, reply = _post_form(url, b"", {"question": "Is there a lesion?"})
    assert status == 400 and reply["error"]  # an empty file part
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata([("question", "Is there a lesion?")])
    status, reply = _post(url, body, {"Content-Type": content_type})
    assert status == 400 and "'volume'" in reply["error"]  # a form without the volume
    status, reply = _post(url, b"--x\r\nContent-Disposition: form-data; name=\"volume\"; filename=\"ct\"\r\nnot ended",
                          {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and reply["error"], reply  # a form cut off mid-part
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
    with pytest.raises(ConfigError, match="scorer.*max_batch_size"):
        from_dict(EvaluateConfig, {"model": "m", "scorer": {"max_batch_size": 0}})


def _recalls_by_argsort(images: np.ndarray, texts: np.ndarray, n: int, k: int) -> tuple[float, float]:
    """R@k both ways among the first n pairs, from the embeddings with numpy alone."""
    similarity = images[:n] @ texts[:n].T
    truth = np.arange(n)[:, None]
    image_to_text = np.mean(np.any(np.argsort(-similarity, axis=1)[:, :k] == truth, axis=1))
    text_to_image = np.mean(np.any(np.argsort(-similarity.T, axis=1)[:, :k] == truth, axis=1))
    return float(image_to_text), float(text_to_image)


def _first_report_per_volume(data_path: str, split: str) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    pairs = {}
    for row in pq.read_table(os.path.join(data_path, "samples.parquet")).to_pylist():
        if row["split"] == split and row["task"] == "caption":
            pairs.setdefault(row["volume_id"], row["answer"])
    return list(pairs.items())


def test_retrieval_table_from_the_evaluation_run(served, siglip_run):
    """Med3DVLM Table 1 from the Serve run: both directions at R@1/5/10, the skipped size listed, the
    recalls equal to numpy's from the written embeddings, and those equal to embedding in this process."""
    import pyarrow.parquet as pq

    from components.evaluation import evaluate_retrieval
    from components.metrics.results import load_results

    cfg, summary = served
    dataset = os.path.basename(cfg.data_path)
    result, = load_results([summary["results"]])
    retrieval = next(t for t in result["tasks"] if t["task"] == "retrieval")
    assert retrieval["skipped_sizes"] == [100] and retrieval["settings"]["checkpoint"] == siglip_run
    assert retrieval["settings"]["n_pairs"] == retrieval["n_samples"] == 3

    embedded = pq.read_table(summary["retrieval_embeddings"]).to_pylist()
    assert [(r["volume_id"], r["report"]) for r in embedded] == _first_report_per_volume(cfg.data_path, "test")
    images = np.array([r["image_embedding"] for r in embedded])
    texts = np.array([r["text_embedding"] for r in embedded])
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    for size in (2, 3):
        for k in (1, 5, 10):
            image_to_text, text_to_image = _recalls_by_argsort(images, texts, size, k)
            assert retrieval["image_to_text"][str(size)][f"R@{k}"] == pytest.approx(image_to_text)
            assert retrieval["text_to_image"][str(size)][f"R@{k}"] == pytest.approx(text_to_image)
            assert 0 <= image_to_text <= 1 and 0 <= text_to_image <= 1

    local = evaluate_retrieval(siglip_run, cfg.data_path, sizes=RETRIEVAL_SIZES, batch_size=3)
    assert np.allclose(local["image_embeddings"], images, atol=1e-5)
    assert np.allclose(local["text_embeddings"], texts, atol=1e-5)

    tables = Path(summary["tables"])
    assert all((tables / f"retrieval__{dataset}{ext}").exists() for ext in (".md", ".csv", ".png"))
    csv_rows = (tables / f"retrieval__{dataset}.csv").read_text(encoding="utf-8").splitlines()
    assert csv_rows[0] == f"Direction,R@K,{result['run']} 2,{result['run']} 3"
    assert [row.split(",")[:2] for row in csv_rows[1:]] == [
        [direction, f"R@{k}"] for direction in ("image→text (IR)", "text→image (TR)") for k in (1, 5, 10)]
    assert all(0 <= float(v) <= 100 for row in csv_rows[1:] for v in row.split(",")[2:])
    assert "Sizes skipped" in (tables / f"retrieval__{dataset}.md").read_text(encoding="utf-8")


def test_retrieval_only_run_needs_no_vlm(served, siglip_run, train_shards, tmp_path):
    """model: null embeds and scores without Serve; on the train split (more pairs than the test split)
    the recalls equal the in-process evaluation's."""
    from components.config import from_dict
    from components.evaluation import evaluate_retrieval
    from components.metrics.results import load_results
    from ray_jobs.evaluate import EvaluateConfig, run

    cfg = from_dict(EvaluateConfig, {
        "model": None, "data_path": train_shards, "split": "train", "output": str(tmp_path),
        "retrieval": {"model": siglip_run, "sizes": [5, 10, 1000], "batch_size": 4, "cpus": 0.5}})
    summary = run(cfg)
    result, = load_results([summary["results"]])
    assert [t["task"] for t in result["tasks"]] == ["retrieval"] and "predictions" not in summary
    retrieval = result["tasks"][0]
    assert retrieval["n_samples"] == len(_first_report_per_volume(train_shards, "train")) >= 10
    assert retrieval["skipped_sizes"] == [1000]
    local = evaluate_retrieval(siglip_run, train_shards, "train", sizes=[5, 10, 1000])["result"]
    for direction in ("image_to_text", "text_to_image"):
        for size in ("5", "10"):
            assert retrieval[direction][size] == pytest.approx(local[direction][size]), (direction, size)
    assert sorted(os.listdir(summary["tables"])) == sorted(
        f"retrieval__{os.path.basename(train_shards)}{ext}" for ext in (".md", ".csv", ".png")) + ["tables.md"]


def test_config_refuses_bad_retrieval_fields():
    from components.config import ConfigError, load
    from ray_jobs.evaluate import EvaluateConfig

    recipe = CONFIGS / "evaluate" / "phantom.yaml"
    for override, where in [("retrieval.sizes=[100, 0]", "retrieval.sizes[1]: must be >= 1"),
                            ("retrieval.batch_size=many", "retrieval.batch_size: expected int"),
                            ("retrieval.size=[100]", "retrieval.size: unknown key"),
                            ("retrieval.ks=[]", "retrieval.ks: must list"),
                            ("model=null", "model: required, unless retrieval.model is set")]:
        with pytest.raises(ConfigError, match=re.escape(f"{recipe}: {where}")):
            load(EvaluateConfig, recipe, [override])
    assert load(EvaluateConfig, recipe, ["model=null", "retrieval.model=runs/cpu-siglip"]).model is None
