"""Raw phantom in a real S3 server (moto_server on 127.0.0.1) -> preprocessing job -> shards in S3; a
training run's progress logs (metrics, TensorBoard) next to it in S3."""
import numpy as np
import pyarrow.parquet as pq
import s3fs

from components.config import from_dict
from components.data.storage import pyarrow_fs
from ray_jobs.make_phantom import MakePhantomConfig
from ray_jobs.make_phantom import run as make_phantom
from ray_jobs.preprocess import PreprocessConfig, run


def test_preprocess_from_s3_to_s3(s3_server, ray_local):
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    fs.mkdir("raw-ct")
    fs.mkdir("shards")
    make_phantom(from_dict(MakePhantomConfig, {
        "output": "s3://raw-ct/phantom", "storage": s3_server,
        "phantom": {"n_volumes": 8, "seed": 5, "scale": 0.3, "dicom_fraction": 0.25}}))
    assert fs.exists("raw-ct/phantom/M3D_Cap.json") and len(fs.ls("raw-ct/phantom/volumes")) == 8
    # one corrupt object in the bucket must be quarantined, not stop the job
    bad = next(p for p in fs.ls("raw-ct/phantom/volumes") if p.endswith(".nii.gz"))
    fs.pipe(bad, fs.cat(bad)[:500])

    cfg = from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": "s3://raw-ct/phantom",
                                       "output": "s3://shards/phantom-qs", "spec": "quickstart",
                                       "spec_overrides": {"size": [16, 32, 32]}, "storage": s3_server,
                                       "compression": "zstd"})
    summary = run(cfg)
    v = summary["volumes"]
    assert v["in"] == 8 and v["in"] == v["out"] + v["quarantined"] and v["out"] == 7
    assert fs.exists("shards/phantom-qs/summary.json") and fs.exists("shards/phantom-qs/samples.parquet")

    import ray

    pfs, path = pyarrow_fs("s3://shards/phantom-qs/volumes", s3_server)
    ds = ray.data.read_parquet(path, filesystem=pfs)
    rows = ds.take_all()
    assert len(rows) == v["out"]
    assert all(r["volume"].shape == (1, 16, 32, 32) and r["volume"].dtype == np.float32 for r in rows)
    assert all(r["source_uri"].startswith("s3://raw-ct/phantom/volumes/") for r in rows)
    shard = next(p for p in fs.ls("shards/phantom-qs/volumes") if p.endswith(".parquet"))
    with fs.open(shard, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    with fs.open("shards/phantom-qs/quarantine.parquet", "rb") as f:
        q = pq.read_table(f).to_pylist()
    assert len([r for r in q if r["stage"] in ("read", "preprocess")]) == v["quarantined"]


def _report(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "lr": 1e-3, "samples_per_s": 8.0, "tokens_per_s": 100.0,
            "data_wait_frac": 0.1, "epoch": 0}


def test_training_progress_reaches_object_storage(s3_server, tmp_path):
    """The Train controller's callback of a run stored in S3: the metrics log is rewritten there at every
    report, and the TensorBoard logs (written on local disk) are copied next to the run at the first
    report, at checkpoints, and not at every report in between."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ray_jobs.train_common import _progress_callback

    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    fs.mkdir("runs")
    local = tmp_path / "tensorboard"
    progress = _progress_callback(3, "s3://runs/vlm/metrics.jsonl", str(local), s3_server, "s3://runs/vlm/tensorboard")

    def copied():
        fs.invalidate_cache()
        return {p.rsplit("/", 1)[1]: fs.cat(p) for p in fs.find("runs/vlm/tensorboard")}

    progress.after_report(None, [_report(1)], None)
    (name, first), = copied().items()
    progress.after_report(None, [_report(2)], None)
    assert copied() == {name: first}  # within the upload interval and no checkpoint: not sent again
    progress.after_report(None, [_report(3)], object())  # a checkpoint
    assert copied() == {name: (local / name).read_bytes()} and len(copied()[name]) > len(first)

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / name).write_bytes(copied()[name])
    events = EventAccumulator(str(tmp_path / "copy"))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0), (3, 0.667)]
    rows = [json.loads(line) for line in fs.cat("runs/vlm/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
