"""MM-GEN throughput: prompts/s and samples/s per stage, pipeline efficiency, and the Ray
generation stage versus the original's chunked-subprocess layout on the same prompts.

Measured in one run, same recipe (default: offline profile), same prompts:

1. **end to end** — the real job (``jobs.core.driver.run``: ingest with the CLIP partition, then
   the row stages and the export); prompts/s and samples/s over the whole wall time (Ray
   already started; actor start and model load included, as a user pays them).
2. **each model stage alone** — the rows that reached it in run 1 through a Ray Data pipeline
   holding only that stage (``benchmarks/antidote.py``'s ``stage_alone``). Pipeline efficiency
   = slowest stage alone ÷ wall time of the row phase (1.0 = the row stages together take no
   longer than their bottleneck alone).
3. **original layout** — MM-GEN's ``batch_data_generator.py``: the prompt list split into
   ``num_parallel`` contiguous chunks, one ``data_generator.py`` subprocess per chunk, each
   loading the model and sending the prompts of its chunk one by one (SPEC D6). Emulated
   with the same model and stage code (``LLMStage`` called with one row at a time) in
   ``--num-parallel`` subprocesses; ratio = its wall time ÷ the Ray generation stage alone.

Usage: ``python benchmarks/mmgen.py [--total-gen 24] [--num-parallel 2]``. Writes
``benchmarks/results/mmgen-<date>.json``. Reads ScienceQA references and COCO/ScienceQA
candidates from ``../shared/data`` (not bundled: licence).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import HERE, ROOT  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def worker(chunk_file: str) -> None:
    """One chunk of the original layout: load the model, then one request per prompt."""
    import numpy as np

    from actors.llm import LLMStage

    spec = json.load(open(chunk_file))
    stage = LLMStage(spec["model"], spec["params"])
    out = []
    for rid, msgs in zip(spec["ids"], spec["messages"]):
        res = stage({"id": np.array([rid], dtype=object), "messages": np.array([msgs], dtype=object)})
        out.append({"id": rid, "parsed": res["parsed"][0]})
    json.dump(out, open(chunk_file + ".out", "w"))


def original_layout(sp, table, num_parallel: int, tmp: str) -> dict:
    """Contiguous chunks (``chunk = total // num_parallel``, last chunk to the end, as the
    original), one subprocess each, all started at once and awaited."""
    ids = table.column("id").to_pylist()
    msgs = table.column("messages").to_pylist()
    n = len(ids)
    size = max(1, n // num_parallel)
    bounds = [(k * size, (k + 1) * size if k < num_parallel - 1 else n) for k in range(num_parallel)]
    t0 = time.time()
    procs = []
    for k, (lo, hi) in enumerate(bounds):
        f = os.path.join(tmp, f"chunk-{k}.json")
        json.dump({"model": sp.resolved.model_dump(), "params": sp.stage.merged(sp.cfg.params),
                   "ids": ids[lo:hi], "messages": msgs[lo:hi]}, open(f, "w"))
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", f], cwd=ROOT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}), f))
    done = 0
    for proc, f in procs:
        if proc.wait() == 0:
            done += len(json.load(open(f + ".out")))
    wall = time.time() - t0
    return {"prompts": n, "num_parallel": num_parallel, "prompts_done": done, "wall_s": round(wall, 2),
            "prompts_per_s": round(done / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-gen", type=int, default=24)
    ap.add_argument("--num-parallel", type=int, default=2)
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import ray
    import torch

    from antidote import _reached, stage_alone  # benchmarks/antidote.py: same per-stage harness
    from jobs.core import driver, store
    from jobs import mmgen as pipeline
    from jobs.core.recipe import load_recipe

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "OMP_WAIT_POLICY",
                                                                   "TOKENIZERS_PARALLELISM")}})
    out = tempfile.mkdtemp(prefix="bench-mmgen-")
    recipe = load_recipe(pipeline.RECIPE, "mmgen", args.profile, overrides=args.set,
                         input=os.path.join(SHARED, "vqa", "scienceqa_test_subset.jsonl"), output=out,
                         candidates=[os.path.join(SHARED, "captions", "coco_mini_images"),
                                     os.path.join(SHARED, "vqa", "scienceqa_images")],
                         keywords=["map", "diagram", "photo"], total_gen=args.total_gen,
                         task_description="Science questions about maps, diagrams and photos.")
    load0 = os.getloadavg()
    t0 = time.time()
    manifest = driver.run(pipeline, recipe, ["benchmarks/mmgen.py"])
    e2e_wall = time.time() - t0
    prompts = manifest["funnel"][0]["out"]
    samples = manifest["outputs"]["samples_generated"]
    p = driver.plan(pipeline, recipe)
    rows = store.read_table(store.work(out, "rows"))
    order = [sp.stage.name for sp in p.row_stages()]
    alone = {}
    for sp in p.row_stages():
        if sp.stage.is_actor:
            t = _reached(rows, order, sp.stage.name)
            if t.num_rows:
                r = stage_alone(sp, t)
                if sp.stage.name == "loss_score":
                    n_s = sum(t.column("n_records").to_pylist())
                    r.update(samples=n_s, samples_per_s=round(n_s / r["wall_s"], 3))
                else:
                    r["prompts_per_s"] = r.pop("rows_per_s")
                alone[sp.stage.name] = r
    slowest = max(alone, key=lambda s: alone[s]["wall_s"])
    gen_sp = next(sp for sp in p.row_stages() if sp.stage.name == "generate")
    gen_rows = _reached(rows, order, "generate")
    # the generate stage reads `messages`, which build_messages produced in the job
    orig = original_layout(gen_sp, gen_rows, args.num_parallel, out)
    result = {
        "benchmark": "mmgen",
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "gpu": torch.cuda.is_available(),
                    "load_avg_start": load0},
        "config": {"profile": args.profile, "total_gen": args.total_gen, "mode": recipe.mode,
                   "overrides": args.set, "models": manifest["models"]},
        "end_to_end": {"prompts": prompts, "samples": samples, "wall_s": round(e2e_wall, 2),
                       "prompts_per_s": round(prompts / e2e_wall, 3), "samples_per_s": round(samples / e2e_wall, 3)},
        "stage_alone": alone,
        "slowest_stage": slowest,
        "pipeline_efficiency": round(alone[slowest]["wall_s"] / e2e_wall, 3),
        "original_chunked_subprocesses": orig,
        "original_vs_ray_generate": round(orig["wall_s"] / alone["generate"]["wall_s"], 3),
        "funnel": manifest["funnel"],
        "notes": ("Pipeline efficiency divides by the whole job's wall time, which includes the ingest "
                  "(reading, CLIP partition of every reference and candidate image, prompt planning) and "
                  "the export. Offline placeholders: random tiny models, so the numbers measure the "
                  "pipeline, not a real VLM."),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"mmgen-{date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("end_to_end", "stage_alone", "slowest_stage", "pipeline_efficiency",
                                             "original_chunked_subprocesses", "original_vs_ray_generate")}, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
