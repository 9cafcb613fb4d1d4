"""`ray job submit` for real: a local cluster started with `ray start`, a training job submitted with
the working directory, SUCCEEDED, and a checkpoint where the run said it would be."""
import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_submit_a_training_job_to_a_local_cluster(train_shards, tmp_path):
    import ray

    from cluster.local import LocalCluster

    ray.shutdown()  # the job gets its own cluster
    runtime_env = {"excludes": ["data/", "runs/", "results/", ".git/", "*.egg-info/"],
                   "env_vars": {"RADRAY_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}}
    with LocalCluster(num_cpus=2) as cluster:
        cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ROOT,
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "ray_jobs.train_vlm", "--config", "ray_jobs/configs/cpu/align.yaml",
               f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=submitted",
               "run.max_steps=4", "run.report_every_n_steps=2", "checkpoint.every_n_steps=4"]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900, env=env, cwd=ROOT)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        assert "succeeded" in log.lower(), log[-3000:]
        job_id = next(w.strip("'") for line in log.splitlines() if "raysubmit_" in line
                      for w in line.split() if "raysubmit_" in w)
        status = subprocess.run(["ray", "job", "status", "--address", cluster.dashboard_url, job_id],
                                capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60, env=env)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert "SUCCEEDED" in plain or "succeeded" in plain, plain[-2000:]
    run = tmp_path / "submitted"
    ckpts = [d for d in os.listdir(run) if d.startswith("checkpoint_") and (run / d).is_dir()]
    assert ckpts and (run / ckpts[-1] / "model" / "config.yaml").exists()
    assert (run / ckpts[-1] / "trainer_state.json").exists() and (run / "loss_curve.png").exists()
