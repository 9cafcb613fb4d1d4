"""A real fault on real Ray: a node is lost mid-run, taking a training worker with it; the run finishes,
its step counter continues from the last checkpoint instead of starting again, and the model learned.

A worker killed on a node that stays up goes through the same path (Ray Train restarts the worker
group, the loop resumes from ``get_checkpoint()``); losing the node is the case that also needs the
placement to be rebuilt across nodes, so it is the one tested. It runs the MAE job under DeepSpeed
ZeRO-3, whose sharded optimizer state must come back whole on the replacement worker group."""
import json
import os
import threading
import time

import psutil

from components.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30  # checkpoints every 6 steps: the fault lands after the first, several follow the restart


def _cfg(train_shards, tmp_path, name, extra=()):
    from ray_jobs.pretrain_mae import MAEJobConfig

    return load(MAEJobConfig, os.path.join(ROOT, "ray_jobs/configs/cpu/mae.yaml"), [
        f"data.path={train_shards}", f"run.storage_path={tmp_path}", f"run.name={name}",
        "run.max_failures=1", "run.epochs=200", f"run.max_steps={STEPS}", "run.report_every_n_steps=3",
        "checkpoint.every_n_steps=6", "data.batch_size=2", *extra])


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_checkpoint(run_dir, timeout=240, every=6):
    """Wait until Ray Train has registered a checkpoint (the controller logged its report)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(h["step"] >= every for h in _history(run_dir)):
                return True
        except (FileNotFoundError, json.JSONDecodeError):
            pass
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


def _assert_resumed(history, every=6):
    steps = [h["step"] for h in history]
    starts = [h["resumed_from"] for h in history]
    # the restarted worker group began at a checkpoint (6, 12, ...), not at step 0 ...
    restarted = [s for s in starts if s > 0]
    assert restarted and all(s % every == 0 for s in restarted), (steps, starts)
    # ... and the step counter carried on from there to the end
    after = [h["step"] for h in history if h["resumed_from"] > 0]
    assert after[0] > restarted[0] and steps[-1] == STEPS, (steps, starts)


def _orphaned_staging_folder() -> str:
    """What a worker killed mid-checkpoint leaves in /tmp: a staging folder of a process that is gone."""
    import socket
    import tempfile

    from conftest import gone_pid

    path = os.path.join(tempfile.gettempdir(), f"radray-ckpt-{socket.gethostname()}-{gone_pid()}-test")
    os.makedirs(os.path.join(path, "model"))
    return path


def _staging_of_gone_processes() -> list[str]:
    import socket
    import tempfile

    mine = f"radray-ckpt-{socket.gethostname()}-"
    return [n for n in os.listdir(tempfile.gettempdir())
            if n.startswith(mine) and not psutil.pid_exists(int(n[len(mine):].split("-", 1)[0]))]


def test_losing_a_node_mid_run(train_shards, tmp_path):
    """Two Ray nodes on this machine, one training worker on each, under DeepSpeed ZeRO-3; the second
    node is removed mid-run and a replacement joins; training continues from the sharded checkpoint."""
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from ray_jobs.common import size_ray_data_for_local

    ray.shutdown()
    size_ray_data_for_local(2)  # the nodes share this machine's cores
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node2 = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}})
        cfg = _cfg(train_shards, tmp_path, "lost-node", ["scaling.placement_strategy=STRICT_SPREAD",
                                                          "strategy.name=deepspeed", "strategy.zero_stage=3"])
        orphan = _orphaned_staging_folder()
        thread, out = _run_in_thread(cfg)
        assert _first_checkpoint(str(tmp_path / "lost-node")), "no checkpoint appeared"
        nodes = {p.pid: p for p in _train_workers()}
        assert len(nodes) == 2
        cluster.remove_node(node2, allow_graceful=False)
        time.sleep(3)
        cluster.add_node(num_cpus=2)  # the replacement the autoscaler would bring
        thread.join(600)
        assert not thread.is_alive() and "error" not in out, out.get("error")
        history = _history(tmp_path / "lost-node")
        _assert_resumed(history)
        losses = [h["loss"] for h in history]
        assert sum(losses[-2:]) / 2 < losses[0], losses  # ZeRO-3 across two nodes, a restart between
        assert os.path.exists(out["summary"]["loss_curve"]) and os.listdir(out["summary"]["tensorboard"])
        # DeepSpeed's engine state came back with the checkpoint: its own step count did not restart
        states = os.path.join(out["summary"]["checkpoint"], "deepspeed", "state", "zero_pp_rank_0_mp_rank_00_model_states.pt")
        assert torch.load(states, map_location="cpu", weights_only=False)["global_steps"] == STEPS
        from safetensors.torch import load_file

        encoder = load_file(os.path.join(out["summary"]["model_dir"], "encoder.safetensors"))
        assert all(v.numel() > 0 for v in encoder.values())  # ZeRO-3 partitions gathered, not saved empty
        # a killed worker's checkpoint copy is reclaimed by the workers that follow it on that host
        assert not os.path.exists(orphan)
        assert not _staging_of_gone_processes()
    finally:
        ray.shutdown()
        cluster.shutdown()
