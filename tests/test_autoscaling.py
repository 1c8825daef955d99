"""Autoscaling on Ray's fake multi-node cluster (tests/fake_cluster.py, node types derived from
cluster.yaml): a real MM-GEN run whose two model stages each ask for a GPU with an autoscaling
actor pool launches GPU nodes from zero (after the CPU type for the CPU work), never more than
each type's max_workers nor more than the pools can use, accounts for every row, and the GPU
nodes are released after the idle timeout. The timeline is kept as the test artifact
``autoscaling_timeline.json`` (``tests.helpers.ARTIFACTS``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.fake_cluster import HEAD_TYPE, IDLE_TIMEOUT_MINUTES, NodeSampler, fake_cluster, timeline
from tests.helpers import ARTIFACTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
VQA = os.path.join(SHARED, "data", "vqa", "scienceqa_test_subset.jsonl")
COCO = os.path.join(SHARED, "data", "captions", "coco_mini_images")
SQA_IMAGES = os.path.join(SHARED, "data", "vqa", "scienceqa_images")
PROMPTS = 12
#: model stage -> (min_actors, max_actors); an actor (GPU 1, CPU 1) fills a fake GPU node.
#: The maxima sum to 4 = the fake gpu_l4's max_workers: every GPU node the job can use is an L4.
POOLS = {"generate": (1, 2), "loss_score": (1, 2)}
RELEASE_SLACK_S = 60


def _mmgen(out: str, address: str) -> subprocess.CompletedProcess:
    """``python -m jobs mmgen`` (offline profile) on the fake cluster, its model stages on GPUs."""
    sets = ["block_rows=6", "partition.batch_size=64"]  # few blocks: few 1-CPU split/reduce tasks
    for stage, (lo, hi) in POOLS.items():
        sets += [f"{stage}.num_gpus=1", f"{stage}.num_cpus=1", f"{stage}.min_actors={lo}",
                 f"{stage}.max_actors={hi}", f"{stage}.batch_size=2"]
    cmd = [sys.executable, "-m", "jobs", "mmgen", "--input", VQA, "--candidates", f"{COCO},{SQA_IMAGES}",
           "--keywords", "map,diagram,photo", "--task-description", "Science questions.",
           "--total-gen", str(PROMPTS), "--output", out, "--address", address]
    for s in sets:
        cmd += ["--set", s]
    # the driver's own default caps Ray Data's parquet footer readers (jobs.core.runtime.RAY_DATA_DEFAULTS)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS")}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)


def _gpu_nodes(sample: dict, gpu_types: set[str]) -> int:
    return sum(c for t, c in sample["nodes"].items() if t in gpu_types)


def _save(tl: dict, samples: list[dict]) -> str:
    report = json.dumps(tl, indent=1)
    print(report)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "autoscaling_timeline.json").write_text(json.dumps({**tl, "samples": samples}))
    return report


@pytest.mark.slow
def test_gpu_nodes_scale_up_for_model_stages_and_are_released(tmp_path):
    if not os.path.exists(VQA) or not os.path.isdir(COCO):
        pytest.skip("../shared data not present")
    from jobs.core import store

    t_begin = time.time()
    out = str(tmp_path / "out")
    with fake_cluster() as fc:
        types = fc.config["available_node_types"]
        gpu_types = {n for n, t in types.items() if t["resources"].get("GPU")}
        sampler = NodeSampler(fc.address, fc.config)
        sampler.start()
        ready = time.time() + 30
        while len(sampler.samples) < 2 and time.time() < ready:
            time.sleep(0.2)
        assert len(sampler.samples) >= 2, sampler.errors[-3:]
        job_start = time.time()
        res = _mmgen(out, fc.address)
        job_end = time.time()
        deadline = job_end + IDLE_TIMEOUT_MINUTES * 60 + RELEASE_SLACK_S
        while time.time() < deadline and (sampler.samples[-1]["t"] < job_end
                                          or _gpu_nodes(sampler.samples[-1], gpu_types)):
            time.sleep(0.5)
        samples = sampler.stop()
        (tmp_path / "monitor.log").write_text(fc.logs("monitor.log", tail=500_000))
    tl = timeline(samples, fc.config, job_start, job_end)
    tl.update(launched_by_type=sampler.launched(), prompts=PROMPTS, pools=POOLS,
              idle_timeout_s=IDLE_TIMEOUT_MINUTES * 60,
              max_workers={n: t["max_workers"] for n, t in types.items() if n != HEAD_TYPE},
              test_wall_s=round(time.time() - t_begin, 1), sampler_errors=sampler.errors[:5])
    why = f"{_save(tl, samples)}\nautoscaler log: {tmp_path / 'monitor.log'}"

    assert res.returncode == 0, res.stderr[-3000:]
    # before the job: the head alone (CPU 0, no GPU)
    assert [s for s in samples if s["t"] < job_start] and tl["gpu_nodes_before_job"] == 0, why
    # the CPU work (ingest, CLIP partition) came first and launched the CPU type
    assert tl["first_node_type"] == ["cpu_workers"], why
    # GPU nodes for the two model stages (each pool starts at min 1), launched while the job ran
    assert tl["first_gpu_node_s"] is not None and tl["first_node_s"] < tl["first_gpu_node_s"] < tl["job_s"], why
    assert tl["peak_gpu_nodes"] >= 2 and tl["peak_gpus_in_use"] >= 2, why
    # no GPU node beyond what the pools can use: the autoscaler picks the one-GPU L4 type for
    # one-GPU actors; an H100 node (CPU 1, GPU 8 here) would mean demand beyond the pools, e.g.
    # CPU work spilling onto GPU types once the CPU type is at its max (it did before the driver
    # capped Ray Data's parquet footer-reader actors)
    launched_gpu = {t: c for t, c in tl["launched_by_type"].items() if t in gpu_types}
    assert set(launched_gpu) == {"gpu_l4"}, why
    assert 2 <= launched_gpu["gpu_l4"] <= sum(hi for _, hi in POOLS.values()) == types["gpu_l4"]["max_workers"], why
    for s in samples:
        for t, c in s["nodes"].items():
            assert c <= (1 if t == HEAD_TYPE else types[t]["max_workers"]), (s, why)
    # every GPU node released within the idle timeout + slack after the job
    assert tl["gpu_nodes_released_s_after_job"] is not None, why
    assert tl["gpu_nodes_released_s_after_job"] <= IDLE_TIMEOUT_MINUTES * 60 + RELEASE_SLACK_S, why
    # every row accounted for
    m = store.load_manifest(out)
    assert m["funnel"][0]["stage"] == "ingest" and m["funnel"][0]["out"] == PROMPTS, m["funnel"]
    for f in m["funnel"]:
        assert f["in"] == f["out"] + f["rejected"] + f["errored"] + f.get("not_selected", 0), f
    committed = store.read_table(store.work(out, "rows"), columns=["id"])
    assert committed.num_rows == len(set(committed.column("id").to_pylist())) == PROMPTS
    stopped = sum(f["rejected"] + f["errored"] for f in m["funnel"][1:] if "unit" not in f)
    assert m["outputs"]["prompts_ok"] + stopped == PROMPTS, m["funnel"]
