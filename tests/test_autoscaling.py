"""aws.yaml's autoscaling settings, exercised on this machine.

Two levels: Ray's resource-demand scheduler planning scale-ups for the real node types (no
processes), and the fake multi-node provider really adding a node for a GPU demand and removing it
once idle (a head plus at most one 1-CPU fake node).
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws.yaml"


def aws():
    return yaml.safe_load(AWS.read_text(encoding="utf-8"))


# -- planning with the real node types


def plan(cfg, pg_bundles=(), tasks=(), strategy="PACK"):
    """Nodes the autoscaler would launch on a cluster holding only its head, and what stays unmet.

    ``pg_bundles`` form one pending placement group, which is how Ray Train asks for its workers.
    """
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.node_provider import NodeProvider
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
    from ray.core.generated.common_pb2 import Bundle, PlacementStrategy
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    cfg = prepare_config(copy.deepcopy(cfg))
    head_type, head_ip = cfg["head_node_type"], "10.0.0.1"

    class HeadOnly(NodeProvider):
        def non_terminated_nodes(self, tag_filters):
            return ["head"]

        def node_tags(self, node_id):
            return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: head_type}

        def internal_ip(self, node_id):
            return head_ip

    scheduler = ResourceDemandScheduler(HeadOnly({}, "plan"), cfg["available_node_types"], cfg["max_workers"],
                                        head_type, cfg["upscaling_speed"])
    pgs = []
    if pg_bundles:
        pg = PlacementGroupTableData(strategy=getattr(PlacementStrategy, strategy))
        pg.bundles.extend(Bundle(unit_resources=b) for b in pg_bundles)
        pgs.append(pg)
    to_launch, unmet = scheduler.get_nodes_to_launch(
        ["head"], {}, list(tasks), {head_ip: {}}, pgs, {head_ip: {}}, [],
        NodeAvailabilitySummary(node_availabilities={}))
    return dict(to_launch), unmet


def gpu_workers(n, **extra):
    return [{"CPU": 8.0, "GPU": 1.0, **extra}] * n  # the GPU recipes' cpus_per_worker


def test_scheduler_plans_scale_ups_as_the_readme_says():
    cfg = aws()
    assert plan(cfg) == ({}, [])  # every min_workers is 0: an idle cluster is just its head
    assert plan(cfg, gpu_workers(4)) == ({"gpu_a10g": 1}, [])  # the E3D-GPT recipes: one 4-GPU node
    assert plan(cfg, gpu_workers(8)) == ({"gpu_a100": 1}, [])  # packs onto one 8-GPU node
    assert plan(cfg, gpu_workers(8, **{"accelerator_type:A10G": 0.001})) == ({"gpu_a10g": 2}, [])
    # max_workers bounds a type: 17 A100 workers get two p4d nodes and one stays unmet.
    launched, unmet = plan(cfg, gpu_workers(17, **{"accelerator_type:A100": 0.001}))
    assert launched == {"gpu_a100": 2} and len(unmet) == 1
    # CPU-only work (preprocessing) does not take GPU nodes.
    assert plan(cfg, tasks=[{"CPU": 1.0}] * 64) == ({"cpu_worker": 2}, [])


def _gpu_recipes():
    cfgs = sorted((ROOT / "ray_jobs" / "configs").glob("*/*.yaml"))
    out = []
    for p in cfgs:
        scaling = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("scaling") or {}
        if scaling.get("use_gpu") is True:
            out.append(pytest.param(p, scaling, id=str(p.relative_to(ROOT))))
    return out or [pytest.param(None, None, id="none-yet")]


@pytest.mark.parametrize("recipe, scaling", _gpu_recipes())
def test_gpu_recipes_fit_the_aws_cluster(recipe, scaling):
    if recipe is None:
        pytest.skip("no recipe with scaling.use_gpu: true under ray_jobs/configs/ yet")
    bundle = {"CPU": float(scaling.get("cpus_per_worker", 1.0)), "GPU": 1.0,
              **{k: float(v) for k, v in (scaling.get("resources_per_worker") or {}).items()}}
    launched, unmet = plan(aws(), [bundle] * scaling.get("num_workers", 2),
                           strategy=scaling.get("placement_strategy", "PACK"))
    assert launched and not unmet, f"aws.yaml cannot host {recipe.name}: launches {launched}, unmet {unmet}"


# -- the fake multi-node provider


def test_fake_config_carries_the_launchers_scaling_keys():
    from ray.autoscaler._private.util import validate_config

    from cluster.local import FAKE_HEAD_TYPE, fake_autoscaling_config

    src = aws()
    fake = fake_autoscaling_config(src, head_cpus=1, max_nodes=1, idle_timeout_minutes=0.1)
    validate_config(fake)  # the check the head's autoscaler runs on it
    workers = {n: t for n, t in src["available_node_types"].items() if n != src["head_node_type"]}
    assert fake["available_node_types"].keys() == {*workers, FAKE_HEAD_TYPE}
    assert fake["upscaling_speed"] == src["upscaling_speed"] and fake["idle_timeout_minutes"] == 0.1
    for name, t in workers.items():
        f = fake["available_node_types"][name]
        assert f["resources"].keys() - {"object_store_memory"} == {k for k, v in t["resources"].items() if v} | {"CPU"}
        assert f["resources"]["CPU"] == 1 and f["resources"].get("GPU", 0) <= 1
        assert f["min_workers"] == t["min_workers"] and f["max_workers"] == min(t["max_workers"], 1)


DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=1, num_gpus=1)
def on_gpu_node():
    import time
    time.sleep(2)
    return ray.get_runtime_context().get_node_id()
print("NODES", json.dumps(ray.get([on_gpu_node.remote() for _ in range(2)], timeout=150)))
"""


@pytest.mark.slow
def test_fake_autoscaler_adds_a_gpu_node_for_demand_and_removes_it_when_idle():
    """The head has no GPU; two GPU tasks make the autoscaler launch one fake GPU worker (the
    fake config caps every type at one node), both tasks run there in turn, and the worker is
    terminated after the idle timeout."""
    from cluster.local import _sessions_members, fake_autoscaling_config, run_on_fresh_cluster

    fake = fake_autoscaling_config(aws(), head_cpus=1, max_nodes=1, idle_timeout_minutes=0.1)
    gpu_types = {n for n, t in fake["available_node_types"].items() if t["resources"].get("GPU")}
    t0 = time.time()

    def body(c):
        monitor_log = Path(c.log_dir) / "monitor.log"

        def log_tail():
            return monitor_log.read_text(encoding="utf-8")[-4000:] if monitor_log.exists() else "(no monitor.log)"

        assert len(c.alive_nodes()) == 1
        start = time.time()
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, c.address], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        seen, peak, deadline = {}, 1, time.time() + 150
        while driver.poll() is None and time.time() < deadline:
            nodes = c.alive_nodes()
            seen.update(nodes)
            peak = max(peak, len(nodes))
            time.sleep(0.5)
        if driver.poll() is None:
            driver.kill()
        out, err = driver.communicate()
        used = time.time() - start
        assert driver.returncode == 0, f"{err[-2000:]}\n--- monitor.log\n{log_tail()}"
        ran_on = set(json.loads(out.split("NODES", 1)[1]))
        assert len(ran_on) == 1, ran_on  # one worker for both tasks: max_workers held
        worker = seen[ran_on.pop()]
        assert not worker["head"] and worker["resources"].get("GPU") == 1
        assert worker["node_type"] in gpu_types, worker
        assert peak == 2, f"peak of {peak} nodes; the fake config allows one worker"

        c._wait(lambda: len(c.alive_nodes()) == 1, "the idle worker to be removed", timeout=90)
        removed = time.time() - start
        # The monitor logs the reason a moment after the node leaves.
        c._wait(lambda: f"Removing 1 nodes of type {worker['node_type']} (idle)" in log_tail(),
                f"monitor.log to report the idle removal\n{log_tail()}", timeout=20)
        return used, removed, {n["sid"] for n in c.nodes}, c.temp_dir

    used, removed, sids, temp_dir = run_on_fresh_cluster(
        body, num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
        autoscaling_config=fake, start_timeout=45)
    assert not _sessions_members(sids, temp_dir, verify=False), "processes left after stop"
    print(f"demand to GPU node used: {used:.1f}s; to node removed: {removed:.1f}s; "
          f"whole test {time.time() - t0:.1f}s")
