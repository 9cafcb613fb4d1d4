"""A real multi-node Ray cluster on this machine, for tests and for trying jobs before a cloud run.

    with LocalCluster(num_cpus=2, extra_nodes=[{"num_cpus": 1, "resources": {"node2": 1}}]) as c:
        ray job submit --address <c.dashboard_url> --working-dir . -- python -m ray_jobs.<job> ...

    python -m cluster.local up --num-cpus 2 --node '1:{"node2": 1}'
    python -m cluster.local down

Every node is a `ray start` on 127.0.0.1 with its own free ports and a private --temp-dir.
`ray stop` cannot be scoped (it stops every Ray process of the user on the host, by process
name), so it is never used here. Instead each `ray start` runs in a new session (setsid): the
GCS, raylet, agents, worker processes and the nodes a fake autoscaler launches all stay in that
session (Ray gives workers their own process group, never a new session). Stopping signals the
members of those sessions, plus anything whose command line names the cluster's temp dir. (The
one process Ray itself detaches, a job supervisor's watcher shell, exits on its own a second
after the cluster stops.)
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
import yaml

HOST = "127.0.0.1"
STATE_FILE = os.path.join(tempfile.gettempdir(), f"radray-local-cluster-{os.getuid()}.json")
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider hard-codes the head's node type name
CORE = ("gcs_server", "raylet/raylet", "dashboard/dashboard.py")  # a node is broken without these


def free_port() -> int:
    """A port no one listens on. Picked below the kernel's ephemeral range (where bind(0) and
    outgoing connections take ports) and above Ray's worker ports (10002-19999), so that it is
    rarely taken by someone else between this check and Ray binding it."""
    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray(*args) -> list[str]:
    # The `ray` CLI of this interpreter, not whichever one is first on PATH.
    return [sys.executable, "-m", "ray.scripts.scripts", *map(str, args)]


def fake_autoscaling_config(launcher, *, head_cpus: int = 1, max_nodes: int = 2,
                            idle_timeout_minutes: float = 0.1,
                            object_store_memory: int = 80 * 2**20) -> dict:
    """A fake_multinode autoscaling config with a launcher file's node types and scaling keys.

    Node types keep their names, which resources they advertise, min/max_workers and the
    upscaling speed; sizes shrink to one unit of each resource (CPU 1, GPU 1, ...) because the
    fake nodes share this machine, and counts are capped at ``max_nodes``.
    """
    if not isinstance(launcher, dict):
        with open(launcher, encoding="utf-8") as f:
            launcher = yaml.safe_load(f)
    types = {}
    for name, spec in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        resources = {k: 1 for k, v in spec.get("resources", {}).items() if v}
        resources.update(CPU=1, object_store_memory=object_store_memory)
        types[name] = {"resources": resources, "node_config": {},
                       "min_workers": min(spec.get("min_workers", 0), max_nodes),
                       "max_workers": min(spec.get("max_workers", max_nodes), max_nodes)}
    types[FAKE_HEAD_TYPE] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
             "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": f"{launcher['cluster_name']}-fake",
        "max_workers": min(launcher.get("max_workers", max_nodes), max_nodes),
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        **{k: [] for k in empty},
    }


def _sessions_members(sids: set[int], temp_dir: str | None, verify: bool) -> list[psutil.Process]:
    """Processes in the given sessions or naming temp_dir. With ``verify``, a session only counts
    if one of its members names temp_dir (a saved session id may have been reused since)."""
    groups: dict[int, list] = {}
    named: set[int] = set()
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me:
            continue
        try:
            sid = os.getsid(p.pid)
        except OSError:
            continue
        has_dir = bool(temp_dir) and temp_dir in " ".join(p.info["cmdline"] or ())
        if sid in sids or has_dir:
            groups.setdefault(sid, []).append(p)
            if has_dir:
                named.add(sid)
    out = []
    for sid, procs in groups.items():
        if sid in named or (sid in sids and not verify):
            out += procs
        else:  # outside our sessions but naming our temp dir
            out += [p for p in procs if temp_dir in " ".join(p.info["cmdline"] or ())]
    return out


def _terminate(procs: list[psutil.Process], grace: float = 5.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait)
        if not procs:
            return


class LocalCluster:
    """A head plus extra nodes, each a `ray start` on 127.0.0.1; a context manager.

    ``extra_nodes``: dicts with ``num_cpus``, ``num_gpus``, ``resources``, ``object_store_memory``.
    ``autoscaling_config``: a dict (e.g. from :func:`fake_autoscaling_config`) for the head's
    autoscaler; a fake_multinode provider gets this cluster's GCS address filled in.
    """

    def __init__(self, num_cpus: int = 2, extra_nodes=(), *, num_gpus: int | None = None,
                 resources: dict | None = None, object_store_memory: int | None = None,
                 include_dashboard: bool = True, autoscaling_config: dict | None = None,
                 env: dict | None = None, start_timeout: float = 60.0, keep_temp: bool = False):
        self.num_cpus, self.extra_nodes = num_cpus, list(extra_nodes)
        self.num_gpus, self.resources, self.object_store_memory = num_gpus, resources, object_store_memory
        self.include_dashboard, self.autoscaling_config = include_dashboard, autoscaling_config
        self.start_timeout, self.keep_temp = start_timeout, keep_temp
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 would otherwise turn token auth on
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir: str | None = None
        self.port = self.dashboard_port = None
        self.nodes: list[dict] = []  # {"sid", "node_id", "head"}
        self._gcs = None

    # -- addresses
    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """For ``ray job submit --address``."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def log_dir(self) -> str:
        return os.path.join(self.temp_dir, "session_latest", "logs")

    # -- lifecycle
    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def start(self, detach: bool = False, attempts: int = 3) -> "LocalCluster":
        # A start can fail for reasons outside this cluster (a port taken in the meantime, a
        # process killed by someone's `ray stop` on a shared host): start afresh a few times.
        for attempt in range(1, attempts + 1):
            # Short path: Ray's unix sockets live under it and must stay below 108 characters.
            self.temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
            self.port, self.dashboard_port = free_port(), free_port()
            if not detach:
                atexit.register(self.stop)
            try:
                self._start_head()
                for spec in self.extra_nodes:
                    self.add_node(**spec)
                if self.include_dashboard:
                    self._wait_for_jobs_api()
                return self
            except Exception as e:
                self.stop()
                if attempt == attempts:
                    raise
                print(f"local cluster start failed (attempt {attempt}/{attempts}), retrying: "
                      f"{str(e).strip().splitlines()[-1][:300]}", file=sys.stderr)
            except BaseException:
                self.stop()
                raise

    def _start_head(self):
        args = ["start", "--head", "--node-ip-address", HOST, "--port", self.port,
                "--num-cpus", self.num_cpus, "--ray-client-server-port", free_port(),
                "--dashboard-agent-listen-port", free_port(),
                "--include-dashboard", str(self.include_dashboard).lower()]
        if self.include_dashboard:
            args += ["--dashboard-host", HOST, "--dashboard-port", self.dashboard_port]
        env = dict(self.env)
        if self.autoscaling_config is not None:
            cfg = json.loads(json.dumps(self.autoscaling_config))
            if cfg["provider"]["type"] == "fake_multinode":
                # Fake nodes would otherwise join <host ip>:6379, i.e. someone else's Ray.
                cfg["provider"]["gcs_address"] = self.address
                env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
            path = os.path.join(self.temp_dir, "autoscaling.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f)
            args += ["--autoscaling-config", path]
        self._launch(args + self._node_args(self.num_gpus, self.resources, self.object_store_memory),
                     env, head=True)

    def _node_args(self, num_gpus, resources, object_store_memory):
        args = ["--temp-dir", self.temp_dir, "--disable-usage-stats"]
        if num_gpus is not None:
            args += ["--num-gpus", num_gpus]
        if resources:
            args += ["--resources", json.dumps(resources)]
        if object_store_memory:
            args += ["--object-store-memory", int(object_store_memory)]
        return args

    def _launch(self, args, env, head=False) -> dict:
        before = set(self.alive_nodes()) if not head else set()
        log_path = os.path.join(self.temp_dir, f"ray-start-{len(self.nodes)}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(_ray(*args), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = {"sid": proc.pid, "node_id": None, "head": head}
        self.nodes.append(node)  # recorded before waiting, so stop() reaches it on failure
        try:
            rc = proc.wait(self.start_timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            with open(log_path, encoding="utf-8") as f:
                raise RuntimeError(f"ray start failed ({rc}): {' '.join(map(str, args))}\n{f.read()[-3000:]}")
        new = self._wait(lambda: set(self.alive_nodes()) - before, "the node to register")
        node["node_id"] = sorted(new)[0]
        node["core"] = [p for p in _sessions_members({node["sid"]}, None, verify=False)
                        if any(k in " ".join(p.info["cmdline"] or ()) for k in CORE)]
        return node

    def add_node(self, num_cpus: int = 1, num_gpus: int | None = None, resources: dict | None = None,
                 object_store_memory: int | None = None) -> dict:
        """Start one more node; returns ``{"sid", "node_id", "head"}`` (pass it to remove_node)."""
        args = ["start", "--address", self.address, "--node-ip-address", HOST, "--num-cpus", num_cpus,
                "--dashboard-agent-listen-port", free_port()]
        return self._launch(args + self._node_args(num_gpus, resources, object_store_memory), self.env)

    def remove_node(self, node: dict, grace: float = 5.0) -> None:
        """Stop one node's processes (a lost node, as far as the rest of the cluster can tell)."""
        _terminate(_sessions_members({node["sid"]}, None, verify=False), grace)
        self.nodes.remove(node)

    def intact(self) -> bool:
        """Whether every GCS, raylet and dashboard process the started nodes had is still running
        (False means something outside killed part of the cluster)."""
        return all(p.is_running() for n in self.nodes for p in n.get("core", ()))

    def stop(self, grace: float = 5.0) -> None:
        if self.temp_dir is None:
            return
        _terminate(_sessions_members({n["sid"] for n in self.nodes}, self.temp_dir, verify=False), grace)
        if not self.keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.nodes, self.temp_dir, self._gcs = [], None, None
        atexit.unregister(self.stop)

    # -- state
    def alive_nodes(self) -> dict[str, dict]:
        """Alive nodes by node id hex, as the GCS reports them (resources, head, node_type, ip)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            if self._gcs is None:
                self._gcs = GcsClient(address=self.address)
            infos = self._gcs.get_all_node_info(timeout=5)
        except Exception:  # GCS not up (yet) or gone
            self._gcs = None
            return {}
        return {info.node_id.hex(): {"resources": dict(info.resources_total), "head": info.is_head_node,
                                     "node_type": info.node_type_name, "ip": info.node_manager_address}
                for info in infos.values() if info.state == GcsNodeInfo.GcsNodeState.ALIVE}

    def _wait(self, check, what, timeout=None):
        deadline = time.time() + (timeout or self.start_timeout)
        while time.time() < deadline:
            out = check()
            if out:
                return out
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what} (logs: {self.log_dir})")

    def _wait_for_jobs_api(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

        def ready():
            try:
                return opener.open(f"{self.dashboard_url}/api/jobs/", timeout=5).status == 200
            except OSError:
                return False
        self._wait(ready, "the dashboard's job API")

    def state(self) -> dict:
        return {"address": self.address, "dashboard_url": self.dashboard_url, "temp_dir": self.temp_dir,
                "nodes": [{k: v for k, v in n.items() if k != "core"} for n in self.nodes]}


def run_on_fresh_cluster(body, attempts: int = 2, **cluster_kwargs):
    """``body(cluster)`` on a new LocalCluster, stopped afterwards. On a host shared with other
    Ray users, something outside (a `ray stop`, a stray kill of a process group) can kill part of
    the cluster mid-run; only then, and up to ``attempts`` times, the body runs on a fresh one."""
    for attempt in range(1, attempts + 1):
        with LocalCluster(**cluster_kwargs) as c:
            try:
                return body(c)
            except Exception:
                if attempt == attempts or c.intact():
                    raise
                print("local cluster processes were killed from outside; running again on a fresh cluster",
                      file=sys.stderr)


def down(state_file: str = STATE_FILE) -> bool:
    """Stop a cluster started by ``up``; only processes it started (checked against its temp dir)."""
    if not os.path.exists(state_file):
        return False
    with open(state_file, encoding="utf-8") as f:
        st = json.load(f)
    _terminate(_sessions_members({n["sid"] for n in st["nodes"]}, st["temp_dir"], verify=True))
    shutil.rmtree(st["temp_dir"], ignore_errors=True)
    os.remove(state_file)
    return True


def _node_spec(text: str) -> dict:
    cpus, _, res = text.partition(":")
    return {"num_cpus": int(cpus), "resources": json.loads(res) if res else None}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head (and extra nodes) on 127.0.0.1")
    up.add_argument("--num-cpus", type=int, default=2)
    up.add_argument("--node", action="append", default=[], type=_node_spec,
                    metavar="CPUS[:RESOURCES_JSON]", help="an extra node, e.g. '1:{\"node2\": 1}'")
    up.add_argument("--object-store-mb", type=int, default=None)
    up.add_argument("--autoscale-from", metavar="LAUNCHER_YAML",
                    help="run the file's node types through the fake autoscaler (e.g. cluster/aws.yaml)")
    dn = sub.add_parser("down", help="stop the cluster started by `up`")
    for p in (up, dn):
        p.add_argument("--state", default=STATE_FILE, help="where `up` records what it started")
    args = ap.parse_args(argv)

    if args.cmd == "down":
        print("stopped" if down(args.state) else f"no cluster recorded in {args.state}")
        return
    if os.path.exists(args.state):
        sys.exit(f"{args.state} records a running cluster; run `python -m cluster.local down` first")
    osm = args.object_store_mb * 2**20 if args.object_store_mb else None
    auto = fake_autoscaling_config(args.autoscale_from, head_cpus=args.num_cpus) if args.autoscale_from else None
    c = LocalCluster(args.num_cpus, [{**n, "object_store_memory": osm} for n in args.node],
                     object_store_memory=osm, autoscaling_config=auto).start(detach=True)
    with open(args.state, "w", encoding="utf-8") as f:
        json.dump(c.state(), f, indent=1)
    print(f"GCS address   {c.address}    (ray.init(address=...), ray start --address ...)\n"
          f"dashboard     {c.dashboard_url}\n"
          f"submit        RAY_AUTH_MODE=disabled ray job submit --address {c.dashboard_url} "
          f"--working-dir . -- python -m ray_jobs.<job> --config ...\n"
          f"logs          {c.log_dir}\n"
          f"stop          python -m cluster.local down")


if __name__ == "__main__":
    main()
