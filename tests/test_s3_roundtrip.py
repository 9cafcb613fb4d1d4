"""Raw phantom in a real S3 server (moto_server on 127.0.0.1) -> preprocessing job -> shards in S3."""
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
