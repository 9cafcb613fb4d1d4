"""cluster/: each file carries what its system requires, and the local cluster really runs jobs:
`ray job submit` of a probe and of a training recipe, with the working directory."""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
# GPUs per instance, for the types the launcher files name.
INSTANCE_GPUS = {"g5.12xlarge": 4, "p4d.24xlarge": 8, "a2-highgpu-4g": 4, "g2-standard-48": 4}


def load(rel):
    return yaml.safe_load((CLUSTER / rel).read_text(encoding="utf-8"))


def test_every_cluster_yaml_is_known_and_parses():
    found = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")}
    assert found == set(LAUNCHERS + KUBERAY + ["runtime_env.yaml"])  # a new file needs its checks here
    for rel in found:
        assert isinstance(load(rel), dict), rel


# -- Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_what_ray_up_needs(name):
    cfg = load(name)
    assert cfg["cluster_name"] and cfg["provider"]["type"] in ("aws", "gcp") and cfg["provider"]["region"]
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    assert head in types and types[head]["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != head}
    for n, t in types.items():
        assert t["node_config"] and isinstance(t["resources"], dict), n
    for n, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], n
    assert cfg["max_workers"] >= sum(t["min_workers"] for t in workers.values())
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0

    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker type"
    for n, t in gpu.items():
        assert t["min_workers"] == 0, f"{n}: GPU nodes must scale from zero"
        node = t["node_config"]
        machine = node.get("InstanceType") or node.get("machineType")
        assert t["resources"]["GPU"] == INSTANCE_GPUS[machine], n
        if cfg["provider"]["type"] == "gcp":  # GCE attaches GPUs only when asked, and they cannot live-migrate
            assert sum(a["acceleratorCount"] for a in node["guestAccelerators"]) == t["resources"]["GPU"]
            assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"]

    # The repo is synced where setup installs it, after the CUDA torch build.
    mounted = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert len(mounted) == 1
    setup = cfg["setup_commands"]
    installs = [i for i, c in enumerate(setup) if re.search(rf"pip install .*-e {re.escape(mounted[0])}\b", c)]
    torch = [i for i, c in enumerate(setup) if "pip install" in c and "torch==" in c]
    assert installs and torch and torch[0] < installs[0], setup
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    # Either no node uses token auth, or all do with the same token file.
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    if any("RAY_AUTH_MODE=token" in c for c in starts):
        assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
        assert any(r.endswith(".ray/auth_token") for r in cfg["file_mounts"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_validates_as_ray_up_would(name):
    import jsonschema  # ships with ray[default]; Ray's own validation needs it
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(cfg, schema)
    # What `ray up` does before launching anything: merge the provider defaults, then validate.
    full = prepare_config(cfg)
    validate_config(full)
    assert full["available_node_types"].keys() == cfg["available_node_types"].keys()
    assert full["worker_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]


def _ray_versions():
    out = {}
    for name in LAUNCHERS:
        out[name] = re.fullmatch(r"rayproject/ray:([\d.]+)-py\d+-gpu", load(name)["docker"]["image"]).group(1)
    out["Dockerfile"] = re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text(encoding="utf-8"), re.M).group(1)
    out["raycluster"] = load(KUBERAY[0])["spec"]["rayVersion"]
    out["rayjob"] = load(KUBERAY[1])["spec"]["rayClusterSpec"]["rayVersion"]
    return out


def test_all_cluster_files_run_one_ray_version():
    assert len(set(_ray_versions().values())) == 1, _ray_versions()


# -- KubeRay


def _containers(group):
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec):
    assert isinstance(spec["rayVersion"], str) and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = spec["workerGroupSpecs"]
    all_containers = list(_containers(head))
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        all_containers += _containers(g)
    for c in all_containers:
        assert c["name"] and c["image"] and c["resources"]["limits"] and c["resources"]["requests"]
    assert "nvidia.com/gpu" not in _containers(head)[0]["resources"]["limits"]
    gpu = [g for g in groups if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    for g in gpu:
        res = _containers(g)[0]["resources"]
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        # Kubernetes refuses extended resources whose request differs from the limit.
        assert int(res["requests"]["nvidia.com/gpu"]) == int(res["limits"]["nvidia.com/gpu"]) >= 1
    # Pods that disagree on token auth cannot join one cluster.
    modes = {e.get("value") for c in all_containers for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"}
    assert len(modes) <= 1
    return gpu


def test_raycluster_manifest():
    m = load(KUBERAY[0])
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster" and m["metadata"]["name"]
    _check_cluster_spec(m["spec"])


def test_rayjob_manifest_runs_a_repo_module_with_a_recipe():
    from ray.runtime_env import RuntimeEnv

    m = load(KUBERAY[1])
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob" and m["metadata"]["name"]
    spec = m["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    gpu_groups = _check_cluster_spec(spec["rayClusterSpec"])

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("ray_jobs.")
    assert (ROOT / (argv[2].replace(".", "/") + ".py")).is_file(), argv[2]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("ray_jobs/configs/") and config.endswith(".yaml")

    # The working_dir is the image's copy of the project (cluster/Dockerfile), i.e. this repo.
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^WORKDIR {re.escape(env['working_dir'])}$", dockerfile, re.M)
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})

    if not (ROOT / config).is_file():
        pytest.skip(f"{config} is not in the repository yet; the module path and the rest were checked")
    scaling = yaml.safe_load((ROOT / config).read_text(encoding="utf-8")).get("scaling", {})
    assert scaling.get("use_gpu") is True, f"{config} is the GPU cluster's job but does not ask for GPUs"
    capacity = sum(g["maxReplicas"] * int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu_groups)
    assert scaling.get("num_workers", 1) <= capacity
    for g in gpu_groups:  # one worker per GPU, each with its CPUs, must fit a pod
        limits = _containers(g)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) * scaling.get("cpus_per_worker", 1) <= float(limits["cpu"])


# -- runtime_env and the README


def test_runtime_env_example():
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    assert set(env) <= {"excludes", "env_vars", "config"}  # RuntimeEnv accepts unknown keys silently
    RuntimeEnv(**env, working_dir=str(ROOT))
    assert {"/data/", "/results/", "/runs/"} <= set(env["excludes"])
    assert "AWS_ENDPOINT_URL" in env["env_vars"] and "HF_HUB_OFFLINE" in env["env_vars"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env["env_vars"]), "no secrets in the repo"


def _excludes_of_every_file():
    rayjob = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    return {"runtime_env.yaml": load("runtime_env.yaml")["excludes"], "kuberay/rayjob.yaml": rayjob["excludes"],
            **{name: load(name)["rsync_exclude"] for name in LAUNCHERS}}


@pytest.mark.parametrize("name", ["runtime_env.yaml", "kuberay/rayjob.yaml", *LAUNCHERS])
def test_excludes_keep_every_code_file_and_drop_the_outputs(name):
    # Ray reads excludes as gitignore patterns and rsync's --exclude works alike: a bare `data/`
    # matches components/data as well, a leading slash anchors it at the top
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", _excludes_of_every_file()[name])
    code = [str(p.relative_to(ROOT)) for d in ("components", "ray_jobs", "tune", "cluster", "datasets")
            for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    assert any(c.startswith("components/data/") for c in code)
    assert not [c for c in code if spec.match_file(c)], name
    assert all(spec.match_file(f"{top}/x.parquet") for top in ("data", "runs", "results")), name


def test_readme_covers_every_target_with_commands_that_name_real_files():
    text = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for section in ("## AWS", "## GCP", "## Kubernetes (KubeRay)", "## This machine"):
        assert section in text
    for cmd in ("ray up -y cluster/aws.yaml", "ray up -y cluster/gcp.yaml", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                "kubectl apply -f cluster/kuberay/rayjob.yaml", "python -m cluster.local up", "--runtime-env cluster/runtime_env.yaml"):
        assert cmd in text, cmd
    for path in set(re.findall(r"\bcluster/[\w./-]+\.(?:yaml|py)\b|cluster/Dockerfile\b", text)):
        assert (ROOT / path).exists(), path
    for module in set(re.findall(r"python -m (ray_jobs\.\w+)", text)):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_readme_gpu_overrides_are_real_config_keys():
    """The README switches GPU settings by overrides; they must load with the job's own config."""
    from components.config import load
    from ray_jobs.train_vlm import VLMJobConfig

    text = (CLUSTER / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "scaling.use_gpu=true" in b)
    argv = shlex.split(block.replace("\\\n", " "))
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if re.match(r"^[a-z_]+\.[\w.]+=", a)]
    cfg = load(VLMJobConfig, str(ROOT / config), overrides)
    assert cfg.scaling.use_gpu and cfg.strategy.name == "deepspeed" and cfg.strategy.precision == "bf16"
    for extra in (['scaling.resources_per_worker={"accelerator_type:A10G": 0.001}'],
                  ["data.path=s3://my-bucket/preprocessed/e3d", "run.storage_path=s3://my-bucket/runs"]):
        load(VLMJobConfig, str(ROOT / config), extra)


# -- the local cluster


def test_stopping_only_touches_the_sessions_it_started():
    from cluster.local import _sessions_members

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert other.pid not in {p.pid for p in _sessions_members({other.pid + 10**6}, "/tmp/rr-none", False)}
        assert other.pid in {p.pid for p in _sessions_members({other.pid}, None, verify=False)}
        # A recorded session that no longer names the cluster's temp dir may be someone else's now.
        assert other.pid not in {p.pid for p in _sessions_members({other.pid}, "/tmp/rr-none", verify=True)}
    finally:
        other.kill()
        other.wait()


JOB = """
import os, ray
ray.init()
@ray.remote(num_cpus=1, resources={"node2": 1})
def probe():
    import components.data.io  # the uploaded copy, not an installed one
    here = os.path.realpath(os.getcwd())
    return [os.environ.get("HF_HUB_OFFLINE"), os.path.isdir("ray_jobs"), os.path.exists("data"),
            os.path.realpath(components.data.io.__file__).startswith(here + os.sep),
            ray.get_runtime_context().get_node_id()]
print("PROBE", *ray.get(probe.remote()))
"""


@pytest.mark.slow
def test_local_cluster_runs_submitted_jobs_with_the_runtime_env(train_shards, tmp_path):
    """One cluster of two nodes for both submissions: starting a cluster costs as much as a job."""
    import ray

    from cluster.local import _sessions_members, run_on_fresh_cluster

    ray.shutdown()  # the jobs get their own cluster
    small = 100 * 2**20
    t0 = time.time()

    def body(c):
        started = time.time() - t0
        nodes = c.alive_nodes()
        node2 = [i for i, n in nodes.items() if n["resources"].get("node2")]
        assert len(nodes) == 2 and len(node2) == 1
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        r = subprocess.run(_ray_cli("job", "submit", "--address", c.dashboard_url,
                                    "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".",
                                    "--", "python", "-c", JOB),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        probe = next(line for line in r.stdout.splitlines() if line.startswith("PROBE")).split()[1:]
        # The task ran on the second node, from the uploaded code (all of it), with the env vars and
        # without data/.
        assert probe == [load("runtime_env.yaml")["env_vars"]["HF_HUB_OFFLINE"], "True", "False", "True", node2[0]]

        _submit_training_job(c, train_shards, tmp_path, env)

        c.remove_node(c.nodes[1])
        c._wait(lambda: len(c.alive_nodes()) == 1, "the removed node to leave", timeout=60)
        return started, {n["sid"] for n in c.nodes}, c.temp_dir

    started, sids, temp_dir = run_on_fresh_cluster(
        body, num_cpus=1, object_store_memory=small,
        extra_nodes=[{"num_cpus": 1, "resources": {"node2": 1}, "object_store_memory": small}])
    assert not _sessions_members(sids, temp_dir, verify=False), "processes left after stop"
    assert not os.path.exists(temp_dir)
    print(f"cluster of 2 nodes up in {started:.1f}s, whole test {time.time() - t0:.1f}s")


def _submit_training_job(c, train_shards, tmp_path, env):
    """`ray job submit` of a training recipe with the working directory: SUCCEEDED, and a checkpoint
    where the run said it would be."""
    # the shipped excludes; offline env vars, since this machine reaches no model hub
    runtime_env = {"excludes": load("runtime_env.yaml")["excludes"],
                   "env_vars": {"RADRAY_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}}
    cmd = _ray_cli("job", "submit", "--address", c.dashboard_url, "--working-dir", ".",
                   "--runtime-env-json", json.dumps(runtime_env), "--",
                   "python", "-m", "ray_jobs.train_vlm", "--config", "ray_jobs/configs/cpu/align.yaml",
                   f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=submitted",
                   "run.max_steps=4", "run.report_every_n_steps=2", "checkpoint.every_n_steps=4")
    done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=900, env=env, cwd=ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log.lower(), log[-3000:]
    job_id = next(w.strip("'") for line in log.splitlines() if "raysubmit_" in line
                  for w in line.split() if "raysubmit_" in w)
    status = subprocess.run(_ray_cli("job", "status", "--address", c.dashboard_url, job_id),
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60, env=env)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert "SUCCEEDED" in plain or "succeeded" in plain, plain[-2000:]
    run = tmp_path / "submitted"
    ckpts = [d for d in os.listdir(run) if d.startswith("checkpoint_") and (run / d).is_dir()]
    assert ckpts and (run / ckpts[-1] / "model" / "config.yaml").exists()
    assert (run / ckpts[-1] / "trainer_state.json").exists() and (run / "loss_curve.png").exists()


def _ray_cli(*args):
    return [sys.executable, "-m", "ray.scripts.scripts", *args]
