"""Raw CT (local disk or s3://) -> fixed-shape Parquet shards + sample tables, across a Ray cluster.

    python -m ray_jobs.preprocess --config ray_jobs/configs/preprocess/quickstart.yaml [key.sub=value ...]

Output under ``output``:
  volumes/*.parquet   one row per volume: id, split, volume (1, D, H, W), spec, spacing_mm (D, H, W),
                      source_spacing_mm (x, y, z), orientation, plane, source_shape, source_uri, source_sha256
  samples.parquet     reports / VQA / diagnosis samples of the volumes that made it
  quarantine.parquet  (+ .csv) every volume or text that did not, with stage, error type and reason
  summary.json        counts in / out / quarantined, volumes per second
Re-running with the same output skips volumes already written or quarantined.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from components.config import parse_cli, to_dict
from components.data.adapters.base import get_adapter, load_card
from components.data.io import MAX_VOXEL_BYTES
from components.data.preprocess import get_spec
from components.data.storage import StorageConfig, exists, join, open_fs, pyarrow_fs, read_bytes, write_bytes
from ray_jobs.common import RayConfig, init_ray


@dataclass
class PreprocessConfig:
    """The preprocessing job."""

    dataset: str = "phantom"
    """Dataset card: a name in datasets/ or a YAML path."""
    dataset_root: str | None = None
    """Overrides the card's root (e.g. a copy in another bucket)."""
    output: str = "data/preprocessed/phantom"
    """Local folder or s3:// prefix for shards, tables and summary."""
    spec: str = "quickstart"
    """Preprocessing spec name (e3d, m3d, med3dvlm, quickstart)."""
    spec_overrides: dict = field(default_factory=dict)
    """Field overrides of the spec, e.g. {size: [16, 32, 32]}."""
    workers: int | None = None
    """Volumes preprocessed at once (one task each); None = one per CPU in the cluster."""
    volumes_per_task: int = 4
    """Most volumes one task reads, preprocesses and writes (one shard), one after another. Fewer task
    launches keep the cores busier (2-4 per task: ~10 % more volumes/s on 2 cores than 1); a job keeps
    at least 4 tasks per worker, so small jobs still spread evenly."""
    max_volume_gb: float = MAX_VOXEL_BYTES / 1024**3
    """Headers that claim more voxel memory than this are refused before reading."""
    limit: int | None = None
    """Process only the first N volumes (smoke runs)."""
    compression: Literal["lz4", "zstd", "snappy", "none"] = "lz4"
    """Parquet codec of the volume shards. Windowed CT tensors compress little: for a 112x224x224
    float32 volume (21.4 MiB) LZ4 and snappy both give ~18.2 MiB, LZ4 at two thirds of snappy's CPU;
    zstd gives ~15.4 MiB for ~30 % more CPU than LZ4, worth it when shards cross a slow link."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint and credentials (empty = the environment's)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def __post_init__(self):
        from components.config import ConfigError

        if self.volumes_per_task < 1:
            raise ConfigError(f"volumes_per_task: must be >= 1, got {self.volumes_per_task}")
        try:
            get_spec({"base": self.spec, **self.spec_overrides})
        except (KeyError, ConfigError) as e:
            raise ConfigError(f"spec_overrides.{e}" if isinstance(e, ConfigError) else f"spec: {e.args[0]}") from None


# CPUs one preprocessing task asks Ray for; SimpleITK gets as many threads, so tasks never oversubscribe.
CPUS_PER_TASK = 1


def preprocess_batch(batch: dict, spec, storage, quarantine_dir, max_bytes) -> dict:
    """Ray Data UDF: a batch of volume items -> records; failures go to quarantine files."""
    import SimpleITK as sitk

    from components.data.pipeline import process_item

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(CPUS_PER_TASK)
    records = []
    for i in range(len(batch["id"])):
        item = {k: batch[k][i] for k in batch}
        item["overrides"] = json.loads(item.pop("overrides_json") or "{}")
        record, bad = process_item(item, spec, storage, max_bytes)
        if bad is not None:
            safe = bad["id"].replace("/", "__")
            write_bytes(join(quarantine_dir, f"{safe}.json"), json.dumps(bad).encode(), storage)
        else:
            records.append(record)
    if not records:
        return {"id": np.array([], dtype=object), "volume": np.zeros((0, 1, *spec.size), dtype=spec.dtype)}
    out = {k: np.array([r[k] for r in records]) for k in records[0] if k != "volume"}
    # batch_size=1: a view with the batch axis added, not a 22 MB copy per volume
    out["volume"] = records[0]["volume"][None] if len(records) == 1 else np.stack([r["volume"] for r in records])
    return out


def spec_conflict(cfg: PreprocessConfig, storage: dict) -> str | None:
    """Why ``cfg.output`` can't be resumed with ``cfg``'s spec (its shards were made with another one,
    and mixing tensor shapes breaks every reader), or None. ``spec.json`` is written before the first
    shard, so a run that stopped before its summary is covered too."""
    before = None
    for name, key in (("spec.json", None), ("summary.json", "spec")):
        uri = join(cfg.output, name)
        if exists(uri, storage):
            record = json.loads(read_bytes(uri, storage))
            before = record if key is None else record.get(key)
            break
    if before is None:
        return None
    now = json.loads(json.dumps(_spec_dict(get_spec({"base": cfg.spec, **cfg.spec_overrides}))))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not changed:
        return None
    return (f"{cfg.output} holds shards made with another spec ({', '.join(changed)}: "
            f"{[before.get(k) for k in changed]} then, {[now.get(k) for k in changed]} now); "
            "write to another output")


def _spec_dict(spec) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.__dict__.items()}


def _done_ids(cfg: PreprocessConfig, storage: dict) -> tuple[set, set]:
    """Ids already written as shards and ids already quarantined (for resuming)."""
    import pyarrow.dataset as pads

    written, quarantined = set(), set()
    fs, vol_path = open_fs(join(cfg.output, "volumes"), storage)
    if fs.exists(vol_path) and fs.ls(vol_path):
        pfs, ppath = pyarrow_fs(join(cfg.output, "volumes"), storage)
        written = set(pads.dataset(ppath, filesystem=pfs, format="parquet").to_table(columns=["id"])["id"].to_pylist())
    fs, qpath = open_fs(join(cfg.output, "quarantine", "items"), storage)
    if fs.exists(qpath):
        for p in fs.ls(qpath):
            with fs.open(p if isinstance(p, str) else p["name"], "rb") as f:
                quarantined.add(json.load(f)["id"])
    return written, quarantined


def _write_table(rows: list[dict], uri: str, storage: dict, csv: bool = False):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue(), storage)
    if csv:
        flat = table.select([c for c in table.column_names if not pa.types.is_list(table.schema.field(c).type)])
        out = io.BytesIO()
        pacsv.write_csv(flat, out)
        write_bytes(uri.rsplit(".", 1)[0] + ".csv", out.getvalue(), storage)


def _quarantine_records(cfg: PreprocessConfig, storage: dict) -> list[dict]:
    fs, qpath = open_fs(join(cfg.output, "quarantine", "items"), storage)
    if not fs.exists(qpath):
        return []
    paths = [p for p in fs.ls(qpath)]
    got = fs.cat(paths) if paths else {}
    if not isinstance(got, dict):
        got = {paths[0]: got}
    return sorted((json.loads(v) for v in got.values()), key=lambda r: r["id"])


def run(cfg: PreprocessConfig) -> dict:
    storage = to_dict(cfg.storage)
    card = load_card(cfg.dataset, [f"root={cfg.dataset_root}"] if cfg.dataset_root else None)
    spec = get_spec({"base": cfg.spec, **cfg.spec_overrides} if cfg.spec_overrides else cfg.spec)
    adapter = get_adapter(card, storage)
    items = adapter.volumes()
    if cfg.limit is not None:
        items = items[: cfg.limit]
    conflict = spec_conflict(cfg, storage)
    if conflict:
        raise ValueError(conflict)
    write_bytes(join(cfg.output, "spec.json"), json.dumps(_spec_dict(spec), indent=1).encode(), storage)
    written, quarantined = _done_ids(cfg, storage)
    todo = [i for i in items if i.id not in written and i.id not in quarantined]
    print(f"[preprocess] {card.name}: {len(items)} volumes, {len(items) - len(todo)} already done, "
          f"{len(todo)} to process with spec {spec.name} {spec.size} -> {cfg.output}", flush=True)

    t0 = time.time()
    if todo:
        ray = init_ray(cfg.ray)
        from ray.data import TaskPoolStrategy

        t0 = time.time()  # throughput excludes starting Ray
        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // CPUS_PER_TASK))
        rows = [{"id": i.id, "source_uri": i.source_uri, "format": i.format, "split": i.split,
                 "overrides_json": json.dumps(i.overrides)} for i in todo]
        tasks = max(min(len(rows), 4 * workers), -(-len(rows) // cfg.volumes_per_task))
        ds = ray.data.from_items(rows, override_num_blocks=tasks)
        # A plain function on a task pool with the write's CPUs and concurrency lets Ray Data fuse read,
        # preprocess and Parquet write into one task per block: the 100-200 MB raw array never leaves
        # its worker, and the output tensor goes straight to Parquet instead of through the object store
        # to a separate write task. (An actor pool cannot fuse with the write.)
        ds = ds.map_batches(
            preprocess_batch, batch_size=1, batch_format="numpy", num_cpus=CPUS_PER_TASK,
            compute=TaskPoolStrategy(size=min(workers, len(rows))),
            fn_kwargs=dict(spec=spec, storage=storage, quarantine_dir=join(cfg.output, "quarantine", "items"),
                           max_bytes=int(cfg.max_volume_gb * 1024**3)),
        )
        pfs, ppath = pyarrow_fs(join(cfg.output, "volumes"), storage)
        # dictionary encoding of a 5M-value tensor column costs ~1 s per volume and saves nothing
        ds.write_parquet(ppath, filesystem=pfs, ray_remote_args={"num_cpus": CPUS_PER_TASK},
                         concurrency=min(workers, len(rows)), use_dictionary=False, write_statistics=False,
                         compression=cfg.compression)
    elapsed = time.time() - t0

    written, quarantined = _done_ids(cfg, storage)
    item_ids = {i.id for i in items}
    out_ids, q_ids = written & item_ids, quarantined & item_ids
    q_records = _quarantine_records(cfg, storage)

    samples, text_bad = adapter.samples()
    kept = [s for s in samples if s["volume_id"] in out_ids]
    lost = [{"id": s["id"], "source_uri": s["volume_id"], "stage": "sample", "error_type": "volume_quarantined"
             if s["volume_id"] in q_ids else "volume_missing",
             "message": f"its volume {s['volume_id']} was " + ("quarantined" if s["volume_id"] in q_ids
                                                             else "not in this run")}
            for s in samples if s["volume_id"] not in out_ids]
    _write_table(kept, join(cfg.output, "samples.parquet"), storage)
    _write_table(q_records + text_bad + lost, join(cfg.output, "quarantine.parquet"), storage, csv=True)
    spec_dict = _spec_dict(spec)
    summary = {
        "dataset": card.name, "spec": spec_dict, "output": cfg.output,
        "volumes": {"in": len(items), "out": len(out_ids), "quarantined": len(q_ids),
                    "processed_this_run": len(todo)},
        "samples": {"in": len(samples) + len(text_bad), "out": len(kept),
                    "quarantined": len(text_bad) + len(lost)},
        "seconds": round(elapsed, 2),
        "volumes_per_second": round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None,
        "quarantine_reasons": _count(q_records + text_bad + lost),
    }
    write_bytes(join(cfg.output, "summary.json"), json.dumps(summary, indent=1).encode(), storage)
    v = summary["volumes"]
    print(f"[preprocess] volumes in {v['in']} = out {v['out']} + quarantined {v['quarantined']}; "
          f"samples {summary['samples']['out']} kept, {summary['samples']['quarantined']} quarantined; "
          f"{summary['volumes_per_second'] or '-'} volumes/s", flush=True)
    if v["in"] != v["out"] + v["quarantined"]:
        raise RuntimeError(f"volume accounting broken: {v}")
    return summary


def _count(records: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in records:
        key = f"{r['stage']}:{r['error_type']}"
        out[key] = out.get(key, 0) + 1
    return out


def main(argv=None):
    cfg = parse_cli(PreprocessConfig, argv, description=__doc__.splitlines()[0])
    summary = run(cfg)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
