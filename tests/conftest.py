"""Shared fixtures: a local Ray, a real S3 server on 127.0.0.1, a small phantom dataset."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RADRAY_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_local_ray(num_cpus: int = 2):
    import ray

    from ray_jobs.common import size_ray_data_for_local

    if not ray.is_initialized():
        size_ray_data_for_local(num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled",
                                           "DS_ACCELERATOR": "cpu"}})
    return ray


@pytest.fixture
def ray_local():
    """A local Ray (2 CPUs, like the machines this runs on), shared by the tests that need one;
    tests that build their own cluster shut it down, and the next user starts it again."""
    yield start_local_ray()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto_server) on 127.0.0.1; yields the storage settings for it."""
    port = free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def train_shards(phantom_dir, tmp_path_factory):
    """The small phantom preprocessed with the quickstart spec: what the training tests stream."""
    from components.config import from_dict
    from ray_jobs.preprocess import PreprocessConfig, run

    start_local_ray()
    out = str(tmp_path_factory.mktemp("shards"))
    run(from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": phantom_dir, "output": out,
                                     "spec": "quickstart"}))
    return out


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A small phantom dataset (24 cases, a few DICOM series)."""
    from components.data.phantom import PhantomConfig, make_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(str(out), PhantomConfig(n_volumes=24, seed=3, scale=0.4, dicom_fraction=0.2))
    return str(out)
