"""Antidote throughput: per-stage rows/s, pipeline efficiency, and Ray vs a sequential loop.

Measured in one run on the same captions and the same recipe (default: offline profile):

1. **end to end** — the real job (``jobs.core.driver.run``) on N captions; rows/s = N / wall time
   (Ray already started, so start-up of the cluster is excluded; the shared LLM engine's start,
   actor start and model load are included, as a user pays them).
2. **each model stage alone** — the rows that reached that stage in run 1, through a Ray Data
   pipeline holding only that stage (same pool settings; LLM stages on the same, already
   running, shared engine); rows/s per stage. Pipeline efficiency = wall time of the slowest
   stage alone ÷ the end-to-end wall time after the engine was up (1.0 = the whole pipeline
   takes no longer than its bottleneck stage on its own: perfect overlap).
3. **sequential loop** — the originals' style: one process, each stage over all rows before
   the next, in recipe batches, the same stage code (``apply_stage``) without Ray Data; model
   stages loaded in-process, LLM stages on **the same shared engine** as run 1 (started inside
   the timed loop, as run 1 starts it), so both sides generate with the same engine.

Writes ``benchmarks/results/antidote-<date>.json`` with the figures, the configuration and
the machine. Usage: ``python benchmarks/antidote.py [--limit 16] [--profile offline]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import ROOT  # noqa: E402

import pyarrow as pa  # noqa: E402

from jobs import antidote as pipeline  # noqa: E402
from jobs.core import driver, funnel, store  # noqa: E402
from jobs.core.recipe import load_recipe  # noqa: E402
from jobs.core.engines import EngineSet  # noqa: E402
from jobs.core.runtime import StageRun, add_stage, apply_stage, forwarded_env  # noqa: E402
from udfs import rows as R  # noqa: E402



def _reached(rows: pa.Table, order: list[str], stage: str) -> pa.Table:
    """Rows that entered ``stage`` in the end-to-end run, with their status reset to ok."""
    t = rows.filter(pa.array(funnel.reached(rows, order, stage)))
    for c in (R.STATUS, R.STAGE, R.REASON):
        t = t.set_column(t.column_names.index(c), c, pa.array([R.OK if c == R.STATUS else ""] * t.num_rows))
    return t


def stage_alone(sp, table: pa.Table, engines: EngineSet, p: driver.Plan) -> dict:
    import ray.data

    ds = ray.data.from_arrow(table)
    t0 = time.time()
    ref = engines.ref(sp.engine, sp.stage.name) if sp.engine else None
    ds = add_stage(ds, sp.stage, sp.cfg, sp.resolved, audit=sp.audit, engine=ref,
                   engine_tasks=p.engines[sp.engine].config.batches_in_flight if sp.engine else 2)
    n = ds.materialize().count()
    wall = time.time() - t0
    return {"rows": n, "wall_s": round(wall, 2), "rows_per_s": round(n / wall, 3)}


def sequential(p: driver.Plan, table: pa.Table) -> float:
    """All stages in one process, stage after stage, each over every row in recipe batches;
    LLM stages on the run's shared engine (started here, inside the timed loop)."""
    t0 = time.time()
    engines = EngineSet(p.engines, "bench-sequential", forwarded_env())
    engines.start(list(p.engines))
    try:
        _sequential_stages(p, table, engines)
    finally:
        engines.stop()
    return time.time() - t0


def _sequential_stages(p: driver.Plan, table: pa.Table, engines: EngineSet) -> None:
    for sp in p.stages:  # (the memory-bank actor of run 1 still serves memory_lookup/memory_add)
        _, outs = sp.stage.columns(sp.cfg.params)
        run = StageRun(sp.stage.name, tuple(outs), sp.stage.filter, sp.audit,
                       bool(sp.resolved and sp.resolved.placeholder), sp.cfg.max_retries,
                       tuple(sp.stage.rename.items()))
        if sp.engine:
            call = sp.stage.actor_class()(model=sp.resolved.model_dump(mode="json"),
                                          params=sp.stage.merged(sp.cfg.params),
                                          engine=engines.ref(sp.engine, sp.stage.name))
        elif sp.stage.is_actor:
            call = sp.stage.actor_class()(model=sp.resolved.model_dump(), params=sp.stage.merged(sp.cfg.params))
        else:
            import functools

            params = sp.stage.validated_params(sp.cfg.params)
            call = functools.partial(sp.stage.target, params=params, **({"audit": sp.audit} if sp.stage.filter else {}))
        parts = [apply_stage(table.slice(k, sp.cfg.batch_size), call, run)
                 for k in range(0, table.num_rows, sp.cfg.batch_size)]
        table = pa.concat_tables(parts, promote_options="permissive")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--input", default=os.path.join(ROOT, "data/captions/coco2017_mini.jsonl"))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    import ray
    import torch

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "OMP_WAIT_POLICY",
                                                                   "TOKENIZERS_PARALLELISM")}})
    out = tempfile.mkdtemp(prefix="bench-antidote-")
    recipe = load_recipe(pipeline.RECIPE, "antidote", args.profile, overrides=args.set, input=args.input,
                         output=out, limit=args.limit)
    t0 = time.time()
    manifest = driver.run(pipeline, recipe, ["benchmarks/antidote.py"])
    e2e_wall = time.time() - t0
    n = args.limit
    p = driver.plan(pipeline, recipe)
    rows = store.read_table(store.work(out, "rows"))
    order = [sp.stage.name for sp in p.stages]

    alone = {}
    engines = EngineSet(p.engines, "bench-alone", forwarded_env())
    engines.start(list(p.engines))
    try:
        for sp in p.stages:
            if sp.stage.is_actor:
                t = _reached(rows, order, sp.stage.name)
                if t.num_rows:
                    alone[sp.stage.name] = stage_alone(sp, t, engines, p)
    finally:
        engines.stop()
    slowest = max(alone, key=lambda s: alone[s]["wall_s"])
    engine_start = sum(e.get("start_s") or 0 for e in manifest["engines"])

    seq_input = store.read_table(store.work(out, "input"))
    seq_wall = sequential(p, seq_input)

    e2e_rate = n / e2e_wall
    result = {
        "benchmark": "antidote",
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "gpu": torch.cuda.is_available(),
                    "load_avg_start": os.getloadavg()},
        "config": {"profile": args.profile, "captions": n, "overrides": args.set,
                   "models": manifest["models"]},
        "end_to_end": {"rows": n, "wall_s": round(e2e_wall, 2), "rows_per_s": round(e2e_rate, 3),
                       "engine_start_s": round(engine_start, 2)},
        "engines": manifest["engines"],
        "stage_alone": alone,
        "slowest_stage": slowest,
        "pipeline_efficiency": round(alone[slowest]["wall_s"] / (e2e_wall - engine_start), 3),
        "sequential_loop": {"rows": n, "wall_s": round(seq_wall, 2), "rows_per_s": round(n / seq_wall, 3)},
        "ray_vs_sequential": round(seq_wall / e2e_wall, 3),
        "funnel": manifest["funnel"],
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    path = os.path.join(ROOT, "benchmarks", "results", f"antidote-{date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("end_to_end", "slowest_stage", "pipeline_efficiency",
                                             "sequential_loop", "ray_vs_sequential")}, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
