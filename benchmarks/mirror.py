"""MIRROR throughput: rows/s per stage, pipeline efficiency, and Ray vs a sequential loop.

MIRROR runs four phases (faces → clients → dialogues → turns), each a Ray Data pipeline over
rows its ingest builds from the earlier phases' committed rows. Measured in one run, same
recipe (default: offline profile, ``--limit 1``: one client × four traits, as the demo):

1. **end to end** — the real job (``jobs.core.driver.run``; Ray already started, so cluster start
   is excluded; actor start and model load are included, as a user pays them). The wall time
   of each phase's Ray pipeline is taken around ``driver.execute`` (read, stages, write).
2. **per stage, in the pipeline** — Ray Data's own statistics as the manifest funnel records
   them (``wall_s`` = first block start to last block end of the stage's operator; stages Ray
   fused into one operator share it): rows in ÷ wall_s.
3. **sequential loop** — the originals' style, phase by phase over the *same* rows: each
   phase's committed input (``OUT/_work/<phase>/input``, built from the Ray run's rows) goes
   through ``benchmarks/antidote.py``'s ``sequential`` (one process, each stage over every
   row in recipe batches before the next, models loaded in-process, the same stage code
   ``apply_stage``, no Ray). A timing wrapper around ``apply_stage`` splits the phase time per
   stage: ``wall_s`` = model load + calls, ``call_s`` = calls only. Torch runs ``--threads``
   threads (default 1, as every Ray actor here: fractional CPUs give OMP_NUM_THREADS=1).

Pipeline efficiency (``benchmarks/antidote.py``'s definition, per phase) = wall time of the
phase's slowest stage alone (step 3: load + calls, in-process) ÷ the phase's Ray wall time;
overall = the sum of those bottlenecks ÷ the end-to-end wall time (phases are barriers, so
the ideal job takes the sum of its phases' bottlenecks). 1.0 = perfect overlap.
Ray vs sequential = sequential wall ÷ Ray wall (> 1: Ray is faster), per phase and summed.

Writes ``benchmarks/results/mirror-<date>.json`` (figures, configuration, machine, load
average at start and end). Usage: ``python benchmarks/mirror.py [--limit 1] [--traits T ...]
[--set stage.key=value ...] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import HERE, ROOT, machine  # noqa: E402

import antidote  # noqa: E402  benchmarks/antidote.py: the sequential loop

from jobs.core import driver, store  # noqa: E402
from jobs import mirror as pipeline  # noqa: E402
from jobs.core.recipe import load_recipe  # noqa: E402
from jobs.core.runtime import forwarded_env  # noqa: E402
from udfs import mirror_screenplay as screenplay  # noqa: E402
from udfs import rows as R  # noqa: E402


def timed_execute(walls: dict[str, float]):
    """``driver.execute`` that records each phase's Ray wall time in ``walls``."""
    inner = driver.execute

    def execute(pipeline, recipe, p, out, input_table, phase="rows", *args, **kwargs):
        t0 = time.time()
        try:
            return inner(pipeline, recipe, p, out, input_table, phase, *args, **kwargs)
        finally:
            walls[phase] = time.time() - t0
    return execute


def ray_stage_rates(funnel: list[dict], phase: str) -> dict[str, dict]:
    """Rows in, wall_s and rows/s per stage of ``phase`` from the manifest funnel."""
    out = {}
    for r in funnel:
        if r.get("phase") == phase and r.get("wall_s") is not None:
            out[r["stage"]] = {"rows": r["in"], "wall_s": r["wall_s"],
                               "rows_per_s": round(r["in"] / r["wall_s"], 3) if r["wall_s"] else None,
                               "fused_with": r.get("fused_with") or []}
    return out


def sequential_phase(p: driver.Plan, phase: str, table) -> dict:
    """``antidote.sequential`` over the phase's stages, split per stage by timing each
    ``apply_stage`` call (a stage's wall = end of its last batch - end of the stage before)."""
    marks: list[tuple[str, int, float, float]] = []
    inner = antidote.apply_stage

    def timed(t, call, run):
        ok = sum(1 for s in t.column(R.STATUS).to_pylist() if s == R.OK)
        t0 = time.time()
        res = inner(t, call, run)
        marks.append((run.name, ok, t0, time.time()))
        return res

    antidote.apply_stage = timed
    try:
        start = time.time()
        wall = antidote.sequential(driver.Plan(p.row_stages(phase)), table)
    finally:
        antidote.apply_stage = inner
    stages, prev = {}, start
    for sp in p.row_stages(phase):
        m = [x for x in marks if x[0] == sp.stage.name]
        end = max(x[3] for x in m)
        rows, secs = sum(x[1] for x in m), end - prev
        stages[sp.stage.name] = {"rows": rows, "wall_s": round(secs, 3),
                                 "call_s": round(sum(x[3] - x[2] for x in m), 3),
                                 "rows_per_s": round(rows / secs, 3) if secs else None}
        prev = end
    return {"rows": table.num_rows, "wall_s": round(wall, 2), "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1, help="distinct clients (default 1, as the demo)")
    ap.add_argument("--traits", nargs="+", choices=list(screenplay.RESISTANCE_TRAITS), default=None,
                    help="resistance traits per client (default: the recipe's, all four)")
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--input", default=os.path.join(ROOT, "data/counseling/cactus_eval_intake.jsonl"))
    ap.add_argument("--faces", default=os.path.join(ROOT, "data/faces"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the sequential loop")
    args = ap.parse_args()

    import ray
    import torch

    info = machine()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": forwarded_env()})
    out = tempfile.mkdtemp(prefix="bench-mirror-")
    recipe = load_recipe(pipeline.RECIPE, "mirror", args.profile, overrides=args.set, input=args.input,
                         output=out, limit=args.limit, faces=args.faces, traits=args.traits)
    p = driver.plan(pipeline, recipe)
    ray_walls: dict[str, float] = {}
    driver.execute = timed_execute(ray_walls)
    t0 = time.time()
    manifest = driver.run(pipeline, recipe, ["benchmarks/mirror.py"])
    e2e_wall = time.time() - t0
    ray.shutdown()  # the sequential loop gets the machine to itself, as the originals did

    torch.set_num_threads(args.threads)
    phases = {}
    for ph in driver.phases_of(pipeline):
        table = store.read_table(store.work(out, ph.name, "input"))
        if ph.name not in ray_walls or table is None or not table.num_rows:
            continue
        seq = sequential_phase(p, ph.name, table)
        slowest = max(seq["stages"], key=lambda s: seq["stages"][s]["wall_s"])
        ray_wall = ray_walls[ph.name]
        phases[ph.name] = {
            "rows": table.num_rows,
            "ray": {"wall_s": round(ray_wall, 2), "rows_per_s": round(table.num_rows / ray_wall, 3),
                    "stages": ray_stage_rates(manifest["funnel"], ph.name)},
            "sequential": seq,
            "slowest_stage": slowest,
            "pipeline_efficiency": round(seq["stages"][slowest]["wall_s"] / ray_wall, 3),
            "ray_vs_sequential": round(seq["wall_s"] / ray_wall, 3),
        }
    ray_sum = sum(ph["ray"]["wall_s"] for ph in phases.values())
    seq_sum = sum(ph["sequential"]["wall_s"] for ph in phases.values())
    bottlenecks = sum(ph["sequential"]["stages"][ph["slowest_stage"]]["wall_s"] for ph in phases.values())
    out_rows = manifest["outputs"]
    result = {
        "benchmark": "mirror",
        "date": date.today().isoformat(),
        "machine": {**info, "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {"profile": args.profile, "limit": args.limit, "traits": recipe.traits, "overrides": args.set,
                   "block_rows": recipe.block_rows, "sequential_torch_threads": args.threads,
                   "models": manifest["models"], "placeholder_stages": manifest["placeholder_stages"]},
        "end_to_end": {"wall_s": round(e2e_wall, 2), "ray_phases_wall_s": round(ray_sum, 2),
                       "clients": args.limit, "dialogues_kept": out_rows.get("dialogues_kept"),
                       "client_turns": out_rows.get("client_turns"),
                       "dialogues_per_s": round(phases.get("dialogues", {}).get("rows", 0) / e2e_wall, 4),
                       "client_turns_per_s": round(phases.get("turns", {}).get("rows", 0) / e2e_wall, 4)},
        "phases": phases,
        "pipeline_efficiency": round(bottlenecks / e2e_wall, 3),
        "sequential_loop": {"wall_s": round(seq_sum, 2)},
        "ray_vs_sequential": round(seq_sum / ray_sum, 3) if ray_sum else None,
        "funnel": manifest["funnel"],
        "notes": ("Offline profile: SmolLM2-135M writes every LLM reply; the image generator, CLIP, NSFW and "
                  "Canary are tiny random-init placeholders, so the figures measure the pipeline, not real "
                  "models. Stages Ray fused into one operator share one wall_s. With --limit 1 the clients "
                  "and dialogues phases hold one block each (block_rows 8), so their stages cannot overlap."),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"mirror-{date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'phase':<10}{'rows':>6}{'ray_s':>9}{'seq_s':>9}{'seq/ray':>9}{'effic.':>8}  slowest stage")
    for name, ph in phases.items():
        print(f"{name:<10}{ph['rows']:>6}{ph['ray']['wall_s']:>9.1f}{ph['sequential']['wall_s']:>9.1f}"
              f"{ph['ray_vs_sequential']:>9.2f}{ph['pipeline_efficiency']:>8.2f}  {ph['slowest_stage']}")
    print(f"end to end {e2e_wall:.1f} s (Ray phases {ray_sum:.1f} s); sequential {seq_sum:.1f} s; "
          f"ray_vs_sequential {result['ray_vs_sequential']}; pipeline efficiency {result['pipeline_efficiency']}")
    print(f"{'stage':<22}{'rows':>6}{'ray rows/s':>12}{'seq rows/s':>12}")
    for ph in phases.values():
        for s, r in ph["sequential"]["stages"].items():
            ray_r = ph["ray"]["stages"].get(s, {}).get("rows_per_s")
            print(f"{s:<22}{r['rows']:>6}{'-' if ray_r is None else ray_r:>12}{r['rows_per_s']:>12}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
