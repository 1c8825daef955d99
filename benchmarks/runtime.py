"""Runtime overhead: Ray start-up, and the cost of a stage on Ray Data with row isolation.

Measures, in one run on this machine:
- ``ray_init_s``: starting a private local cluster (``ray.init(address="local")``);
- per-stage overhead: a pipeline of K identity task stages (``jobs.core.runtime.add_stage``, the
  real stage helper with status columns and error isolation) over N rows, for K = 0, 1, 4, 8;
  the slope (seconds per extra stage) and the per-row cost;
- ``apply_stage`` alone (no Ray) on the same rows: the helper's own cost per row;
- an actor stage (pool of 1) versus the same work as a task stage.

Writes ``benchmarks/results/runtime-<date>.json``. Usage: ``python benchmarks/runtime.py``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import ROOT  # noqa: E402

import pyarrow as pa  # noqa: E402

from jobs.core.recipe import StageConfig  # noqa: E402
from jobs.core.runtime import Stage, StageRun, add_stage, apply_stage  # noqa: E402
from udfs import rows as R  # noqa: E402

N = 4000


def identity(batch, params):
    """A stage that copies one column (the work is negligible; what remains is overhead)."""
    return {"y": list(batch["x"])}


class Identity:
    """The same work as a model-actor class (for the actor-pool measurement)."""

    Params = None

    def __init__(self, model=None, params=None):
        pass

    @classmethod
    def columns(cls, params):
        return ["x"], ["y"]

    def __call__(self, batch):
        return {"y": list(batch["x"])}


def table(n: int) -> pa.Table:
    cols = {"id": [f"r{i}" for i in range(n)], "x": list(range(n))}
    for c in R.CONTROL_COLUMNS:
        cols[c] = [R.OK if c == R.STATUS else ""] * n
    return pa.table(cols)


def run_pipeline(k: int, actor: bool = False) -> float:
    import ray.data

    ds = ray.data.from_arrow(table(N)).repartition(8)
    cfg = StageConfig(batch_size=500, num_cpus=0.25)
    for j in range(k):
        stage = Stage(f"s{j}", "runtime:Identity") if actor else \
            Stage(f"s{j}", identity, ("x",), ("y",))
        ds = add_stage(ds, stage, cfg)
    t0 = time.time()
    n = ds.materialize().count()
    assert n == N
    return time.time() - t0


def main() -> None:
    import ray

    t0 = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    init_s = time.time() - t0
    run_pipeline(1)  # warm the worker pool
    walls = {k: min(run_pipeline(k) for _ in range(3)) for k in (0, 1, 4, 8)}
    slope = (walls[8] - walls[0]) / 8
    t = table(N)
    run = StageRun("s", ("y",))
    t0 = time.time()
    for k in range(0, N, 500):
        apply_stage(t.slice(k, 500), lambda b: identity(b, None), run)
    direct = time.time() - t0
    actor_wall = min(run_pipeline(1, actor=True) for _ in range(2))
    result = {
        "benchmark": "runtime",
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__,
                    "load_avg": os.getloadavg()},
        "rows": N,
        "ray_init_s": round(init_s, 2),
        "pipeline_wall_s_by_stage_count": {str(k): round(v, 3) for k, v in walls.items()},
        "seconds_per_extra_task_stage": round(slope, 4),
        "apply_stage_direct_s_per_1000_rows": round(direct / N * 1000, 4),
        "one_actor_stage_wall_s": round(actor_wall, 3),
        "actor_vs_task_stage": round(actor_wall / walls[1], 2),
    }
    path = os.path.join(ROOT, "benchmarks", "results", f"runtime-{date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
