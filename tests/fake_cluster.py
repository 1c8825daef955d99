"""Ray's fake multi-node autoscaler (provider ``fake_multinode``) with node types derived from
``cluster.yaml``, for the autoscaling test (tests/test_autoscaling.py).

Every trap handled here was measured on Ray 2.60 in ../shared/notes/scale.md §1 ("Traps (item 1)"):

- autoscaler v1 with a *complete* yaml (trap 1: the wheel lacks ``fake_multi_node/example.yaml``,
  so v2 and ``ray.cluster_utils.AutoscalingCluster`` crash; v1 reads the yaml verbatim);
- ``RAY_FAKE_CLUSTER=1`` and ``AUTOSCALER_UPDATE_INTERVAL_S=1`` in the environment of ``ray start``;
- ``setsid ray start --head --block`` in its own process group, torn down by killing that group,
  SIGTERM then SIGKILL after a few seconds, never ``ray stop`` (trap 2: it is machine-wide, and
  SIGTERM alone takes ~40 s because ``--block`` drains against the dead GCS);
- a free, non-default GCS port named in ``provider.gcs_address`` (trap 3: fake workers dial 6379);
- ``launch_multiple: true`` (trap 4: the default launches one node per batch);
- a CPU worker type beside the GPU types (trap 5: CPU bundles would otherwise launch GPU nodes);
- ``RAY_AUTH_MODE=disabled`` on both sides (trap 7), a fresh short ``--temp-dir`` per cluster
  (trap 8; unix socket paths must stay short).

Fake node resources: each worker type of cluster.yaml keeps its name, GPU count and its
``accelerator_type:*`` resources (so Ray's scheduler and the autoscaler's node-type choice see
the real GPU shapes) but its CPU is capped (1 on GPU types: one model actor of ``num_cpus`` 1
fills the node; 4 on CPU types: room for Ray Data's 1-CPU split/reduce tasks beside the small
ones), with a 300 MB object store, because every fake node is a real raylet on this machine
(~255 MB idle); ``min_workers`` 0, ``max_workers`` capped at 4, idle timeout 15 s.

The fake head keeps cluster.yaml's ``CPU: 0`` (the faithful choice): CPU work (reading, the
CLIP partition, the CPU stages, writing) must then launch the CPU worker type, so a test can
check which type CPU-only demand launched. It costs one node start (~5-10 s).

Measured here (tests/test_autoscaling.py): CPU demand beyond the CPU type's ``max_workers``
makes autoscaler v1 launch GPU types for it (``AUTOSCALER_CONSERVE_GPU_NODES`` only orders
its preference), and Ray Data 2.60's parquet reader alone asks for 32 one-CPU actors
(``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), which the driver therefore lowers
(``jobs.core.runtime.RAY_DATA_DEFAULTS``).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")
HEAD_TYPE = "ray.head.default"  # hard-coded by the fake provider for the head node
FAKE_CPUS_GPU_NODE = 1  # one model actor (num_cpus 1, num_gpus 1) fills a fake GPU node
FAKE_CPUS_CPU_NODE = 4  # room for Ray Data's 1-CPU split/reduce tasks beside the small ones
FAKE_MAX_WORKERS = 4  # per type: up to 4 GPU + 4 CPU fake nodes beside the head on this box
FAKE_OBJECT_STORE = 300_000_000
IDLE_TIMEOUT_MINUTES = 0.25
#: every top-level key v1 expects: it reads the fake yaml verbatim, no defaults merged (trap 1)
_EMPTY_KEYS = {"auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
               "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
               "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
               "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def load_cluster_yaml(path: str = CLUSTER_YAML) -> dict:
    """The launcher config the fake cluster is derived from."""
    with open(path) as f:
        return yaml.safe_load(f)


def fake_config(cluster: dict, gcs_address: str) -> dict:
    """The complete fake_multinode autoscaler-v1 config for ``cluster`` (a cluster.yaml dict).

    Worker types keep their names, GPU count and custom resources (``accelerator_type:*``);
    CPU is capped at ``FAKE_CPUS_GPU_NODE``/``FAKE_CPUS_CPU_NODE``, ``max_workers`` at
    ``FAKE_MAX_WORKERS``, ``min_workers`` is 0 (a per-type ``idle_timeout_s`` is dropped).
    The head becomes ``ray.head.default`` with the head type's CPU/GPU counts.
    """
    head_name = cluster["head_node_type"]
    head_res = cluster["available_node_types"][head_name].get("resources", {})
    types = {HEAD_TYPE: {"resources": {"CPU": int(head_res.get("CPU", 0)), "GPU": int(head_res.get("GPU", 0))},
                         "node_config": {}, "max_workers": 0}}
    for name, nt in cluster["available_node_types"].items():
        if name == head_name:
            continue
        res = {k: v for k, v in nt.get("resources", {}).items() if k not in ("CPU", "memory")}
        cap = FAKE_CPUS_GPU_NODE if res.get("GPU") else FAKE_CPUS_CPU_NODE
        res["CPU"] = min(int(nt.get("resources", {}).get("CPU", cap)), cap)
        res["object_store_memory"] = FAKE_OBJECT_STORE
        types[name] = {"resources": res, "node_config": {}, "min_workers": 0,
                       "max_workers": min(int(nt.get("max_workers", FAKE_MAX_WORKERS)), FAKE_MAX_WORKERS)}
    return {
        "cluster_name": f"{cluster.get('cluster_name', 'mmsynth')}_fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True, "gcs_address": gcs_address},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        **copy.deepcopy(_EMPTY_KEYS),
    }


def node_type_of(node: dict, cfg: dict) -> str:
    """The fake config's node type of a ``ray.nodes()`` entry, matched on its resources
    (CPU, GPU and custom resources; the head carries ``node:__internal_head__``)."""
    res = node["Resources"]
    if "node:__internal_head__" in res:
        return HEAD_TYPE

    def shape(r: dict) -> dict:
        return {k: float(v) for k, v in r.items()
                if v and k not in ("memory", "object_store_memory") and not k.startswith("node:")}

    for name, t in cfg["available_node_types"].items():
        if name != HEAD_TYPE and shape(t["resources"]) == shape(res):
            return name
    raise AssertionError(f"node {node['NodeID'][:8]} matches no node type: {res}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class NodeSampler(threading.Thread):
    """Records the cluster every ``period`` s: alive nodes per type, GPUs in use and alive
    actors per class (the Ray Data actor pools are ``MapWorker(...)`` actors).

    It reads the GCS directly (``GlobalState``, what ``ray.nodes()`` uses) instead of
    ``ray.init``: the pytest process may already be connected to the session's private
    cluster (conftest ``ray_local``), and a process holds one Ray connection.
    """

    def __init__(self, address: str, cfg: dict, period: float = 0.5):
        super().__init__(daemon=True)
        import ray._private.state
        import ray._raylet

        self.state = ray._private.state.GlobalState()
        self.state._initialize_global_state(ray._raylet.GcsClientOptions.create(
            address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        self.cfg, self.period = cfg, period
        self.samples: list[dict] = []
        self.seen: dict[str, set[str]] = {}  # node type -> node ids seen alive
        self.errors: list[str] = []
        self._halt = threading.Event()

    def sample(self) -> dict:
        """One snapshot: ``{"t", "nodes": {type: alive}, "gpus_in_use", "cpus_in_use_on_gpu_nodes", "actors"}``."""
        nodes = [n for n in self.state.node_table() if n["Alive"]]
        avail = self.state.available_resources_per_node()
        counts: dict[str, int] = {}
        gpus_used = cpus_on_gpu = 0.0
        for n in nodes:
            t = node_type_of(n, self.cfg)
            counts[t] = counts.get(t, 0) + 1
            self.seen.setdefault(t, set()).add(n["NodeID"])
            a = avail.get(n["NodeID"])
            if n["Resources"].get("GPU") and a is not None:  # a fully used resource is left out of ``a``
                gpus_used += n["Resources"]["GPU"] - a.get("GPU", 0)
                cpus_on_gpu += n["Resources"].get("CPU", 0) - a.get("CPU", 0)
        actors: dict[str, int] = {}
        for a in self.state.actor_table(None, actor_state_name="ALIVE").values():
            actors[a["ActorClassName"]] = actors.get(a["ActorClassName"], 0) + 1
        return {"t": time.time(), "nodes": counts, "gpus_in_use": gpus_used,
                "cpus_in_use_on_gpu_nodes": cpus_on_gpu, "actors": actors}

    def launched(self) -> dict[str, int]:
        """Distinct nodes seen alive per type over the whole recording."""
        return {t: len(ids) for t, ids in self.seen.items()}

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as e:  # noqa: BLE001 - a GCS hiccup under load must not end the timeline
                self.errors.append(f"{time.time():.1f} {type(e).__name__}: {e}")
            self._halt.wait(self.period)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(10)
        return self.samples


class FakeCluster:
    """A fake multi-node cluster: ``start()`` launches the head, ``stop()`` kills its process group.

    ``address`` is ``<node ip>:<gcs port>`` (what ``--address``/``RAY_ADDRESS`` take);
    ``config`` the fake autoscaler config; ``temp_dir`` holds the session logs
    (``session_latest/logs/monitor.*`` for the autoscaler).
    """

    def __init__(self, cluster: dict | None = None):
        import ray.util

        self.ip = ray.util.get_node_ip_address()
        self.port = _free_port()
        self.address = f"{self.ip}:{self.port}"
        self.config = fake_config(cluster or load_cluster_yaml(), self.address)
        self.temp_dir = tempfile.mkdtemp(prefix="rfk", dir="/tmp")  # short: unix socket paths
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        """Environment of ``ray start`` (inherited by the autoscaler and the fake nodes)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's cluster
        return {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout: float = 120) -> None:
        """Start the head (``ray start --head --block`` in a new session) and wait until its
        GCS lists the head node alive."""
        cfg_path = os.path.join(self.temp_dir, "fake_cluster.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(self.config, f)
        head = self.config["available_node_types"][HEAD_TYPE]["resources"]
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "start", "--head", "--block", f"--autoscaling-config={cfg_path}",
               f"--num-cpus={head['CPU']}", f"--num-gpus={head['GPU']}", f"--port={self.port}",
               f"--node-ip-address={self.ip}", f"--ray-client-server-port={_free_port()}",
               "--dashboard-agent-listen-port=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--object-store-memory={FAKE_OBJECT_STORE * 2}", f"--temp-dir={self.temp_dir}"]
        with open(os.path.join(self.temp_dir, "ray_start.log"), "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # setsid: its own process group
        sampler = NodeSampler(self.address, self.config)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.logs('ray_start.log')}")
            try:
                if sampler.sample()["nodes"].get(HEAD_TYPE):
                    return
            except Exception:  # noqa: BLE001 - GCS not up yet
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"fake head not up after {timeout} s")

    def logs(self, name: str, tail: int = 3000) -> str:
        """The tail of a log file of the cluster (``ray_start.log``, ``monitor.log``, ``monitor.err`` ...)."""
        for path in (os.path.join(self.temp_dir, name), os.path.join(self.temp_dir, "session_latest", "logs", name)):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    return f.read()[-tail:]
        return ""

    def stop(self, grace: float = 5) -> None:
        """Kill the head's process group (head, autoscaler, fake worker raylets and their
        workers): SIGTERM, then SIGKILL after ``grace`` s; then remove the temp dir."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                end = time.time() + wait
                while time.time() < end and (self.proc.poll() is None or _group_alive(pgid)):
                    time.sleep(0.2)  # poll() reaps the leader: a zombie still counts in its group
            self.proc.wait(5)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def fake_cluster(cluster: dict | None = None):
    """``with fake_cluster() as fc:`` a started ``FakeCluster``, always torn down."""
    fc = FakeCluster(cluster)
    try:
        fc.start()
        yield fc
    finally:
        fc.stop()


def timeline(samples: list[dict], cfg: dict, job_start: float, job_end: float) -> dict:
    """Summary of a sampler's records relative to the job: first node of each kind, peak
    nodes per type, peak GPUs in use and actors per class, and when the GPU nodes were gone."""
    gpu_types = {n for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}
    rel = lambda s: round(s["t"] - job_start, 1)  # noqa: E731
    gpu_nodes = lambda s: sum(c for t, c in s["nodes"].items() if t in gpu_types)  # noqa: E731
    workers = [s for s in samples if any(t != HEAD_TYPE for t in s["nodes"])]
    first_gpu = next((s for s in samples if gpu_nodes(s)), None)
    after = [s for s in samples if s["t"] >= job_end]
    released = next((s for s in after if not gpu_nodes(s)), None)
    peak_types: dict[str, int] = {}
    peak_actors: dict[str, int] = {}
    for s in samples:
        for t, c in s["nodes"].items():
            peak_types[t] = max(peak_types.get(t, 0), c)
        for a, c in s["actors"].items():
            peak_actors[a] = max(peak_actors.get(a, 0), c)
    return {
        "job_s": round(job_end - job_start, 1),
        "gpu_nodes_before_job": max((gpu_nodes(s) for s in samples if s["t"] < job_start), default=0),
        "first_node_type": sorted(t for t in workers[0]["nodes"] if t != HEAD_TYPE) if workers else None,
        "first_node_s": rel(workers[0]) if workers else None,
        "first_gpu_node_s": rel(first_gpu) if first_gpu else None,
        "peak_gpu_nodes": max((gpu_nodes(s) for s in samples), default=0),
        "peak_nodes_by_type": peak_types,
        "peak_gpus_in_use": max((s["gpus_in_use"] for s in samples), default=0),
        "peak_cpus_in_use_on_gpu_nodes": max((s["cpus_in_use_on_gpu_nodes"] for s in samples), default=0),
        "peak_actors": peak_actors,
        "gpu_nodes_at_job_end": gpu_nodes(after[0]) if after else None,
        "gpu_nodes_released_s_after_job": round(released["t"] - job_end, 1) if released else None,
        "samples": len(samples),
    }


if __name__ == "__main__":  # print the derived config: python -m tests.fake_cluster
    print(json.dumps(fake_config(load_cluster_yaml(), "IP:PORT"), indent=1))
