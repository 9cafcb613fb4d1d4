"""Real faults on real Ray: a killed training worker and a lost node; the run finishes and its step
counter continues from the last checkpoint instead of starting again."""
import json
import os
import signal
import threading
import time

import psutil
import pytest

from components.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(train_shards, tmp_path, name, extra=()):
    from ray_jobs.pretrain_mae import MAEJobConfig

    return load(MAEJobConfig, os.path.join(ROOT, "ray_jobs/configs/cpu/mae.yaml"), [
        f"data.path={train_shards}", f"run.storage_path={tmp_path}", f"run.name={name}",
        "run.max_failures=1", "run.epochs=200", "run.max_steps=60", "run.report_every_n_steps=2",
        "checkpoint.every_n_steps=6", "data.batch_size=2", *extra])


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_checkpoint(run_dir, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(run_dir) and any(d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d))
                                          for d in os.listdir(run_dir)):
            return True
        time.sleep(0.2)
    return False


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def _run_in_thread(cfg):
    from ray_jobs.train_common import fit

    out = {}

    def target():
        try:
            out["summary"] = fit(cfg, "ray_jobs.pretrain_mae.MAEJobConfig")
        except BaseException as e:  # surfaced by the test
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _assert_resumed(history, every=6, report=2):
    steps = [h["step"] for h in history]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert restarts, f"no restart visible in {steps}"
    first_after = steps[restarts[0]]
    # the restarted workers report the step after a checkpoint (6, 12, ...), never the first step again
    assert first_after > report and (first_after - report) % every == 0, steps
    assert steps[-1] == 60, steps


def test_a_killed_worker_restarts_from_the_last_checkpoint(train_shards, tmp_path, ray_local):
    cfg = _cfg(train_shards, tmp_path, "killed")
    thread, out = _run_in_thread(cfg)
    assert _first_checkpoint(str(tmp_path / "killed")), "no checkpoint appeared"
    workers = _train_workers()
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    _assert_resumed(_history(tmp_path / "killed"))


def test_losing_a_node_mid_run(train_shards, tmp_path):
    """Two Ray nodes on this machine, one training worker on each; the second node is removed
    mid-run and a replacement joins; training continues from the checkpoint."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node2 = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}})
        cfg = _cfg(train_shards, tmp_path, "lost-node", ["scaling.placement_strategy=STRICT_SPREAD"])
        thread, out = _run_in_thread(cfg)
        assert _first_checkpoint(str(tmp_path / "lost-node")), "no checkpoint appeared"
        nodes = {p.pid: p for p in _train_workers()}
        assert len(nodes) == 2
        cluster.remove_node(node2, allow_graceful=False)
        time.sleep(3)
        cluster.add_node(num_cpus=2)  # the replacement the autoscaler would bring
        thread.join(600)
        assert not thread.is_alive() and "error" not in out, out.get("error")
        _assert_resumed(_history(tmp_path / "lost-node"))
    finally:
        ray.shutdown()
        cluster.shutdown()
