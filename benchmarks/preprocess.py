"""Preprocessing throughput: the Ray Data job vs. MONAI in one process vs. the read-only floor.

    python -m benchmarks.preprocess [--volumes 16] [--workers N] [--data DIR]

The same N adult-sized phantom CTs (512x512x200 int16 at 0.7x0.7x2.5 mm, .nii.gz) go through the
``e3d`` spec (RAS, 1.5x1.5x3 mm, HU [-1000, 1000], 112x224x224):
  (a) the usual MONAI chain in one process (LoadImage, Orientation, Spacing, ScaleIntensityRange,
      ResizeWithPadOrCrop), as the peer repositories run it;
  (b) ``ray_jobs.preprocess`` on a local Ray with one task per core, reading, preprocessing and
      writing Parquet shards; run twice on one Ray session: ``cold`` is the first job (worker
      processes start and import), ``warm`` the same job again (what every job after the first,
      or a long job, pays per volume);
  (c) the floor: only reading and gunzipping the same files, in one process, with zlib (what
      nibabel, MONAI and Python's gzip use) and with ISA-L's inflate (what radray's reader uses).
It also times radray's read + preprocess in one process, so a per-volume cost that grows inside Ray
shows. Printed: volumes/s, wall and CPU seconds per volume, the machine's load average after each
phase, the ratios, and the peak resident memory of any Ray worker.

CPU seconds are measured alongside wall time because on a shared machine the kernel divides the cores
between sessions (autogroup scheduling): while another session keeps them busy, the Ray job's
processes together get about half the machine, much as a one-process baseline does, so the wall-clock
per-core ratio overstates Ray's cost; CPU seconds per volume do not depend on what else runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import zlib


def make_volumes(folder: str, n: int) -> list[str]:
    from components.data.phantom import PhantomConfig, make_phantom_dataset

    cfg = PhantomConfig(n_volumes=n, seed=1, scale=0.97, shape=(512, 512, 200), spacing=(0.7, 0.7, 2.5),
                        planes=("axial",), dicom_fraction=0.0)
    vols = os.path.join(folder, "volumes")
    have = len(os.listdir(vols)) if os.path.exists(os.path.join(folder, "phantom.json")) else 0
    if have < n:  # a cache made for fewer volumes would silently shrink the run
        print(f"making {n} phantom volumes of 512x512x200 in {folder} (once; reused afterwards)", flush=True)
        make_phantom_dataset(folder, cfg)
    return sorted(os.path.join(vols, f) for f in os.listdir(vols))[:n]


class Timing:
    """Wall and CPU seconds of one phase over ``n`` volumes, and the 1-minute load average after it."""

    def __init__(self, n: int, wall: float, cpu: float):
        self.n, self.wall, self.cpu, self.load = n, wall, cpu, os.getloadavg()[0]

    @property
    def rate(self) -> float:
        return self.n / self.wall


def in_process(paths: list[str], one) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    for p in paths:
        one(p)
    return Timing(len(paths), time.perf_counter() - wall, time.process_time() - cpu)


def floor(paths: list[str], inflate=zlib) -> Timing:
    def read_gunzip(p):
        with open(p, "rb") as f:
            raw = f.read()
        # inflated into one buffer of the final size (the gzip trailer's), as radray's reader does with
        # the size from the NIfTI header: the floor must not be slower than what it bounds
        inflate.decompress(raw, wbits=31, bufsize=int.from_bytes(raw[-4:], "little"))
    return in_process(paths, read_gunzip)


def monai_single_process(paths: list[str]) -> Timing:
    import torch

    from components.data.preprocess import monai_reference

    torch.set_num_threads(1)
    return in_process(paths, monai_reference("e3d"))


def radray_single_process(paths: list[str]) -> Timing:
    import SimpleITK as sitk

    from components.data.io import read_volume
    from components.data.preprocess import preprocess_volume

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    return in_process(paths, lambda p: preprocess_volume(read_volume(p), "e3d"))


class RayProcesses:
    """CPU seconds of this process and every process it started (Ray's daemons and workers), of the Ray
    worker processes alone, and the peak RSS of any Ray worker, sampled while a job runs."""

    def __init__(self):
        self.peak_mb, self.cpu, self.worker_cpu, self._stop = 0.0, 0.0, 0.0, threading.Event()

    def _poll(self, baseline: dict, last: dict):
        import psutil

        me, workers = psutil.Process(), set()
        while True:
            stopping = self._stop.is_set()  # one last sample after the job ended
            for p in [me, *me.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    last[p.pid] = t.user + t.system
                    if p.name().startswith("ray::") or "ray::" in " ".join(p.cmdline()):
                        workers.add(p.pid)
                        self.peak_mb = max(self.peak_mb, p.memory_info().rss / 2**20)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.cpu = sum(v - baseline.get(pid, 0.0) for pid, v in last.items())
            self.worker_cpu = sum(last[pid] - baseline.get(pid, 0.0) for pid in workers)
            if stopping:
                return
            time.sleep(0.2)

    def __enter__(self):
        import psutil

        me = psutil.Process()
        baseline = {}
        for p in [me, *me.children(recursive=True)]:
            t = p.cpu_times()
            baseline[p.pid] = t.user + t.system
        self._t = threading.Thread(target=self._poll, args=(baseline, {}), daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def start_ray():
    """Ray started before the jobs are timed: their wall and CPU figures exclude it, as the job's own clock does."""
    from ray_jobs.common import RayConfig, init_ray

    init_ray(RayConfig())


def ray_job(folder: str, n: int, workers: int | None) -> tuple[Timing, float, float]:
    from components.config import from_dict
    from ray_jobs.preprocess import PreprocessConfig, run

    out = tempfile.mkdtemp(prefix="radray-bench-")
    try:
        cfg = from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": folder, "output": out,
                                           "spec": "e3d", "workers": workers, "limit": n})
        with RayProcesses() as procs:
            summary = run(cfg)
        assert summary["volumes"]["out"] == n, summary["volumes"]
        # the job's own clock: from its first task submission to its last shard, Ray's start excluded
        return Timing(n, summary["seconds"], procs.cpu), procs.worker_cpu, procs.peak_mb
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="Ray tasks at once (default: one per core)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "radray-bench-phantom"))
    args = ap.parse_args()
    os.environ.setdefault("RADRAY_PROGRESS", "0")
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    paths = make_volumes(args.data, args.volumes)
    n = len(paths)
    load_start = os.getloadavg()[0]

    from isal import isal_zlib

    fl = floor(paths)
    fl_isal = floor(paths, isal_zlib)
    ours = radray_single_process(paths)
    mon = monai_single_process(paths)
    start_ray()
    cold, _, peak_cold = ray_job(args.data, n, args.workers)
    warm, warm_worker_cpu, peak_warm = ray_job(args.data, n, args.workers)

    print(f"\n{n} volumes of 512x512x200 int16 (.nii.gz) -> e3d spec (1, 112, 224, 224); {cores} cores; "
          f"1-minute load average {load_start:.2f} before the first phase")
    print(f"{'pipeline':46s} {'vol/s':>7s} {'s/vol':>7s} {'CPU s/vol':>10s} {'load':>6s}")
    rows = [("(c) floor: read + gunzip (zlib), 1 process", fl),
            ("    floor: read + gunzip (ISA-L), 1 process", fl_isal), ("(a) MONAI chain, 1 process", mon),
            ("    radray read + preprocess, 1 process", ours),
            (f"(b) Ray Data job, {workers} tasks at once, cold", cold),
            (f"(b) Ray Data job, {workers} tasks at once, warm", warm)]
    for name, t in rows:
        print(f"{name:46s} {t.rate:7.2f} {1 / t.rate:7.2f} {t.cpu / t.n:10.2f} {t.load:6.2f}")
    print("  s/vol = wall seconds / volumes; CPU s/vol = CPU seconds of every process involved / volumes "
          "(for Ray: the driver, Ray's daemons and workers);\n  cold = the first job on a freshly started Ray "
          "(worker start-up and imports included), warm = the same job again;\n  load = 1-minute load average "
          f"after the phase (this benchmark's own processes count: up to {workers + 1} during the Ray job)")
    print(f"\nRay job vs MONAI single process (vol/s ratio): warm {warm.rate / mon.rate:.2f}x, "
          f"cold {cold.rate / mon.rate:.2f}x   (target >= 4x)")
    for label, f in (("zlib", fl), ("ISA-L", fl_isal)):
        print(f"Ray cost per volume per core vs the {label} floor's (target <= 1.6x):\n"
              f"  wall clock, ({workers} tasks x Ray s/vol) / floor s/vol: warm "
              f"{f.rate / (warm.rate / workers):.2f}x, cold {f.rate / (cold.rate / workers):.2f}x\n"
              f"  CPU seconds per volume, Ray / floor:                 warm {warm.cpu / f.cpu:.2f}x, "
              f"cold {cold.cpu / f.cpu:.2f}x")
    print(f"Ray per volume vs radray in 1 process: wall per core warm {(workers / warm.rate) * ours.rate:.2f}x, "
          f"CPU warm {warm.cpu / ours.cpu:.2f}x (Ray's worker processes alone: {warm_worker_cpu / n:.2f} CPU s/vol, "
          f"{warm_worker_cpu / ours.cpu:.2f}x; the rest is the driver and Ray's daemons, which grows with wall time)")
    starved = [name.strip() for name, t in rows[:4] if t.cpu < 0.9 * t.wall]
    if starved or load_start > 0.5:
        print(f"note: other processes used the cores (load {load_start:.2f} before the first phase; under 90 % of a "
              f"core for: {', '.join(starved) or 'none'}). The kernel shares the cores between sessions, so the "
              "Ray job's processes together get about what one process of this session gets: its wall-clock "
              "figures then overstate its cost against the 1-process ones; the CPU figures do not")
    print(f"peak RSS of a Ray worker: {max(peak_cold, peak_warm):.0f} MiB")


if __name__ == "__main__":
    main()
