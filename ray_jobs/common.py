"""What every job shares: connecting to Ray and the config pieces for it."""
from __future__ import annotations

import os
from dataclasses import dataclass

RUNTIME_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                    "RADRAY_PHANTOM_ROOT", "HF_HUB_OFFLINE", "NLTK_DATA", "DS_ACCELERATOR")


def size_ray_data_for_local(num_cpus: int | None) -> None:
    """Size Ray Data's pools to a Ray started on this machine with ``num_cpus`` CPUs (None = all cores).

    Every Parquet read lists its files through a pool of footer-reading actors, 32 by default: on a
    laptop, 32 processes started for each dataset, about 10 s of every training run's start-up on 2 cores
    (``benchmarks/train_overhead.py``, part (f)). One per CPU lists a few hundred shards as fast. The pool is sized
    where the read is planned, in the driver, so this sets the driver's environment, which a local Ray's
    processes inherit; a value set beforehand wins, and clusters keep Ray's default."""
    cpus = num_cpus or os.cpu_count() or 1
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, min(32, cpus))))


@dataclass
class RayConfig:
    """How the job reaches Ray."""

    address: str | None = None
    """Cluster address; None joins the cluster of ``ray job submit`` (RAY_ADDRESS) or starts a local one."""
    num_cpus: int | None = None
    """CPUs of a locally started Ray; None = all cores."""
    include_dashboard: bool = True
    """Start the dashboard with a local Ray (a cluster has its own). Ray Train asks its state API, once a
    second, whether a run's controller is still alive; without it every training run prints a warning
    each time."""


def init_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ[k] for k in RUNTIME_ENV_VARS if k in os.environ}
    # Ray's progress bars and logs hold non-ASCII characters; a C locale would make them fail to print
    env.setdefault("PYTHONIOENCODING", os.environ.get("PYTHONIOENCODING", "utf-8"))
    # Workers must import this project however the job was started.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=True)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # a submitted job already carries its runtime env (working dir, env vars); adding ours conflicts
        ray.init(address=address, log_to_driver=True,
                 **({} if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS") else
                    {"runtime_env": kwargs["runtime_env"]}))
    else:
        size_ray_data_for_local(cfg.num_cpus)
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, **kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = os.environ.get("RADRAY_PROGRESS", "1") != "0"
    return ray
