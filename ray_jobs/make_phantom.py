"""Write the phantom CT dataset (volumes, reports, VQA and label tables) to a folder or s3:// prefix.

    python -m ray_jobs.make_phantom --config ray_jobs/configs/phantom/quickstart.yaml [key.sub=value ...]

Each case is a pure function of (seed, index), so the same config always writes the same files;
an output that already holds the same phantom is left as it is.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from components.config import parse_cli, to_dict
from components.data.phantom import PhantomConfig, make_phantom_dataset
from components.data.storage import StorageConfig, is_remote, open_fs


@dataclass
class MakePhantomConfig:
    """The phantom-dataset job."""

    output: str = "data/phantom"
    """Local folder or s3:// prefix (written locally first, then uploaded)."""
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    """What to generate."""
    workers: int | None = None
    """Processes rendering cases; null = one per CPU core. The dataset is the same for any number."""
    overwrite: bool = False
    """Regenerate even if ``output`` already holds a phantom with the same settings."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint and credentials for an s3:// output."""

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 (or null for one per CPU core), got {self.workers}")


def progress_printer(label: str):
    t0 = time.time()

    def report(done: int, total: int):
        if done == total or done % max(1, total // 10) == 0:
            eta = (time.time() - t0) / done * (total - done)
            print(f"[{label}] {done}/{total} volumes, ETA {eta:.0f} s", flush=True)
    return report


def run(cfg: MakePhantomConfig) -> dict:
    import json

    storage = to_dict(cfg.storage)
    local = cfg.output if not is_remote(cfg.output) else tempfile.mkdtemp(prefix="radray-phantom-")
    marker = os.path.join(local, "phantom.json")
    if not cfg.overwrite and not is_remote(cfg.output) and os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            existing = json.load(f)
        if existing.get("config") == json.loads(json.dumps(to_dict(cfg.phantom))):
            print(f"[make_phantom] {cfg.output} already holds this phantom; skipping", flush=True)
            return existing
    if os.path.isdir(local) and not is_remote(cfg.output):
        shutil.rmtree(local)
    workers = cfg.workers or os.cpu_count() or 1
    summary = make_phantom_dataset(local, cfg.phantom, progress=progress_printer("make_phantom"), workers=workers)
    if is_remote(cfg.output):
        fs, path = open_fs(cfg.output, storage)
        fs.put(local.rstrip("/") + "/", path, recursive=True)
        shutil.rmtree(local)
    print(f"[make_phantom] wrote {summary['n_volumes']} volumes ({summary['dicom']} as DICOM series), "
          f"splits {summary['splits']} -> {cfg.output}", flush=True)
    return summary


def main(argv=None):
    run(parse_cli(MakePhantomConfig, argv, description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
