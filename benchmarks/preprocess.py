"""Preprocessing throughput: the Ray Data job vs. MONAI in one process vs. the read-only floor.

    python -m benchmarks.preprocess [--volumes 16] [--workers N] [--data DIR]

The same N adult-sized phantom CTs (512x512x200 int16 at 0.7x0.7x2.5 mm, .nii.gz) go through the
``e3d`` spec (RAS, 1.5x1.5x3 mm, HU [-1000, 1000], 112x224x224):
  (a) the usual MONAI chain in one process (LoadImage, Orientation, Spacing, ScaleIntensityRange,
      ResizeWithPadOrCrop), as the peer repositories run it;
  (b) ``ray_jobs.preprocess`` on a local Ray with one actor per core, reading, preprocessing and
      writing Parquet shards;
  (c) the floor: only reading and gunzipping the same files, in one process.
It also times radray's transform in one process, so a per-volume cost that grows inside Ray shows.
Printed: volumes/s for each, the ratios, and the peak resident memory of any Ray worker.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import threading
import time



def make_volumes(folder: str, n: int) -> list[str]:
    from components.data.phantom import PhantomConfig, make_phantom_dataset

    cfg = PhantomConfig(n_volumes=n, seed=1, scale=0.97, shape=(512, 512, 200), spacing=(0.7, 0.7, 2.5),
                        planes=("axial",), dicom_fraction=0.0)
    marker = os.path.join(folder, "phantom.json")
    if not os.path.exists(marker):
        print(f"making {n} phantom volumes of 512x512x200 in {folder} (once; reused afterwards)", flush=True)
        make_phantom_dataset(folder, cfg)
    vols = os.path.join(folder, "volumes")
    return sorted(os.path.join(vols, f) for f in os.listdir(vols))[:n]


def floor(paths: list[str]) -> float:
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            gzip.decompress(f.read())
    return len(paths) / (time.perf_counter() - t)


def monai_single_process(paths: list[str]) -> float:
    import torch

    from components.data.preprocess import monai_reference

    torch.set_num_threads(1)
    run = monai_reference("e3d")
    t = time.perf_counter()
    for p in paths:
        run(p)
    return len(paths) / (time.perf_counter() - t)


def radray_single_process(paths: list[str]) -> float:
    import SimpleITK as sitk

    from components.data.io import read_volume
    from components.data.preprocess import preprocess_volume

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    t = time.perf_counter()
    for p in paths:
        preprocess_volume(read_volume(p), "e3d")
    return len(paths) / (time.perf_counter() - t)


class WorkerMemory:
    """Peak RSS of Ray worker processes, sampled while the job runs."""

    def __init__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()

    def __enter__(self):
        import psutil

        def poll():
            while not self._stop.is_set():
                for p in psutil.process_iter(["name", "cmdline"]):
                    try:
                        if "ray::" in " ".join(p.info["cmdline"] or []) or (p.info["name"] or "").startswith("ray::"):
                            self.peak_mb = max(self.peak_mb, p.memory_info().rss / 2**20)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                time.sleep(0.2)
        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def ray_job(folder: str, n: int, workers: int | None) -> tuple[float, float]:
    from components.config import from_dict
    from ray_jobs.preprocess import PreprocessConfig, run

    out = tempfile.mkdtemp(prefix="radray-bench-")
    try:
        cfg = from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": folder, "output": out,
                                           "spec": "e3d", "workers": workers, "limit": n})
        with WorkerMemory() as mem:
            summary = run(cfg)
        assert summary["volumes"]["out"] == n, summary["volumes"]
        return summary["volumes_per_second"], mem.peak_mb
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per core)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "radray-bench-phantom"))
    args = ap.parse_args()
    os.environ.setdefault("RADRAY_PROGRESS", "0")
    cores = os.cpu_count() or 1
    paths = make_volumes(args.data, args.volumes)
    n = len(paths)

    fl = floor(paths)
    ours = radray_single_process(paths)
    mon = monai_single_process(paths)
    ray_rate, peak = ray_job(args.data, n, args.workers)
    workers = args.workers or cores

    print(f"\n{n} volumes of 512x512x200 int16 (.nii.gz) -> e3d spec (1, 112, 224, 224); {cores} cores")
    print(f"{'pipeline':44s} {'vol/s':>7s} {'s/vol':>7s}")
    for name, rate in [("(c) floor: read + gunzip, 1 process", fl),
                       ("(a) MONAI chain, 1 process", mon),
                       ("    radray transform, 1 process", ours),
                       (f"(b) Ray Data job, {workers} workers (+ Parquet)", ray_rate)]:
        print(f"{name:44s} {rate:7.2f} {1 / rate:7.2f}")
    print(f"\nRay job vs MONAI single process: {ray_rate / mon:.2f}x   (target >= 4x)")
    print(f"floor vs Ray job per core:       {fl / (ray_rate / workers):.2f}x  (target <= 1.6x)")
    print(f"per-volume cost, Ray worker vs 1 process: {(workers / ray_rate) / (1 / ours):.2f}x")
    print(f"peak RSS of a Ray worker: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
