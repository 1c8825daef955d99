"""Antidote downstream throughput: preference pairs/s (``antidote-pairs``) and DPO samples/s
(``antidote-dpo-train``), plus an estimate of the paper profile's GPU time per 1,000 pairs.

Measured in one run on this machine, offline profile (tiny LLaVA placeholder as the target VLM on
the transformers backend, all-MiniLM-L6-v2 embedder, TRL ``DPOTrainer`` + LoRA on one CPU Ray
Train worker), so the figures measure the engine's overheads on CPU, not paper-scale models:

1. **pairs** — an Antidote-like output folder (``tests.helpers.antidote_output``: the real COCO
   photos of ../shared, ``--copies`` x 4 rows x 4 query types) through ``python -m jobs
   antidote-pairs``; queries/s and pairs/s over the Ray Data execution (first operator start
   to last operator end, from the manifest's ``stage_stats``) and over the whole command (Ray
   start, engine load and export included); per-stage rows/s; tokens per request.
2. **DPO** — ``python -m jobs antidote-dpo-train`` on those pairs for ``--dpo-steps`` steps of
   ``--dpo-batch`` pairs; samples/s (pairs per second) and the median step time are the job's
   own manifest figures (first step excluded).
3. **paper estimate** (not measured: no GPU here) — GPU seconds per 1,000 pairs for llava-1.5-7b
   from the measured structure (2 generations per query, text tokens per prompt) scaled to
   LLaVA-1.5's 576 image tokens, with the assumptions written into the results: a FLOP count
   per token (2 x params forward; DPO: policy forward + backward, a recomputed forward under
   gradient checkpointing, the reference forward), an assumed model-FLOP utilisation, an assumed
   vLLM decode rate, an assumed answer length and an assumed pair yield (the paper publishes
   none, SPEC C10).

Writes ``benchmarks/results/pairs_dpo-<date>.json``. Usage: ``python benchmarks/pairs_dpo.py
[--copies 4] [--dpo-steps 8] [--dpo-batch 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import HERE, machine  # noqa: E402

from jobs.core import cli  # noqa: E402

#: llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px -> 576 image tokens; Vicuna-7B language model
PAPER_MODEL = {"image_tokens": 576, "lm_params": 6.74e9, "vision_params": 0.30e9}
#: assumptions of the estimate (documented, not measured)
ASSUMPTIONS = {
    "gpu": "A100 80GB (bf16 dense peak 312 TFLOP/s)", "peak_tflops": 312.0,
    "mfu_train": 0.35, "mfu_prefill": 0.5,
    "decode_tokens_per_s_per_gpu": 2000.0,
    "answer_tokens_mean": 100,
    "pair_yield": 0.5,
    "dpo_flops_per_token_factor": 10.0,
    "notes": ("decode: vLLM batched decode of a 7B model on one A100, order of magnitude from public vLLM "
              "benchmarks; answer length: short CPQ/TPQ/POPE answers, longer descriptions; pair yield: pairs kept "
              "after the 0.9 cosine filter per query answered (unpublished, SPEC C10); DPO FLOPs per token: "
              "policy forward 2N + activation backward 2N (LoRA: no weight gradients of the frozen base) + "
              "recomputed forward 2N (gradient checkpointing) + reference forward 2N, +2N margin for the vision "
              "tower, LoRA and attention = 10N"),
}


def _span(stage_stats: list[dict]) -> float:
    return max(r["ended"] for r in stage_stats) - min(r["started"] for r in stage_stats)


def pairs_run(work: str, copies: int) -> dict:
    from tests.helpers import antidote_output

    ant = antidote_output(os.path.join(work, "antidote"), n=4, copies=copies)
    out = os.path.join(work, "pairs")
    t0 = time.time()
    if cli.main(["antidote-pairs", "--input", ant, "--output", out]) != 0:
        raise SystemExit("antidote-pairs failed")
    wall = time.time() - t0
    m = json.load(open(os.path.join(out, "manifest.json")))
    queries = m["funnel"][0]["out"]
    pairs = m["outputs"]["pairs"]
    span = _span(m["stage_stats"])
    (engine,) = m["engines"]
    per_req = {s: {"prompt_tokens": round(v["prompt_tokens"] / v["requests"], 1),
                   "completion_tokens": round(v["completion_tokens"] / v["requests"], 1)}
               for s, v in engine["served"].items()}
    return {"queries": queries, "pairs": pairs, "pair_yield": round(pairs / queries, 3),
            "by_type": m["outputs"]["by_type"], "execute_s": round(span, 2), "command_wall_s": round(wall, 1),
            "queries_per_s": round(queries / span, 3), "pairs_per_s": round(pairs / span, 3),
            "pairs_per_s_end_to_end": round(pairs / wall, 3), "engine_start_s": engine.get("start_s"),
            "per_stage_rows_per_s": {r["operator"]: r["rows_per_s"] for r in m["stage_stats"]},
            "tokens_per_request": per_req, "output": out}


def dpo_run(work: str, pairs_out: str, steps: int, batch: int) -> dict:
    ckpt = os.path.join(work, "dpo")
    t0 = time.time()
    if cli.main(["antidote-dpo-train", "--data", pairs_out, "--output", ckpt, "--max-steps", str(steps),
                 "--batch-size", str(batch), "--save-steps", str(steps)]) != 0:
        raise SystemExit("antidote-dpo-train failed")
    m = json.load(open(os.path.join(ckpt, "manifest.json")))
    return {"pairs": m["data"]["pairs"], "steps": m["steps_this_run"], "batch_size": batch,
            "samples_per_s": m["throughput"]["samples_per_s"], "step_s_median": m["throughput"]["step_s_median"],
            "step_s_first": m["throughput"]["step_s_first"], "job_wall_s": round(time.time() - t0, 1),
            "loss_curve": [(p["step"], round(p["loss"], 4)) for p in m["loss_curve"]],
            "reload_identical": (m["reload_check"] or {}).get("identical")}


def paper_estimate(pairs: dict, tiny_image_tokens: int = 16) -> dict:
    """GPU seconds per 1,000 pairs for the paper profile (see the module docstring)."""
    a, mdl = ASSUMPTIONS, PAPER_MODEL
    n = mdl["lm_params"]
    text = {s: max(0.0, v["prompt_tokens"] - tiny_image_tokens) for s, v in pairs["tokens_per_request"].items()
            if s in ("answer", "answer_hint")}
    prompt_tokens = sum(mdl["image_tokens"] + t for t in text.values())  # both prompts of one query
    queries = 1000 / a["pair_yield"]
    flops_prefill = queries * prompt_tokens * 2 * n
    prefill_s = flops_prefill / (a["peak_tflops"] * 1e12 * a["mfu_prefill"])
    decode_s = queries * 2 * a["answer_tokens_mean"] / a["decode_tokens_per_s_per_gpu"]
    seq = mdl["image_tokens"] + text.get("answer", 0) + a["answer_tokens_mean"]  # one DPO sequence
    dpo_flops = 1000 * 2 * seq * a["dpo_flops_per_token_factor"] * n  # chosen + rejected per pair
    dpo_s = dpo_flops / (a["peak_tflops"] * 1e12 * a["mfu_train"])
    return {"queries_answered_per_1000_pairs": round(queries), "prompt_tokens_per_query": round(prompt_tokens),
            "sampling_gpu_s": round(prefill_s + decode_s), "sampling_prefill_gpu_s": round(prefill_s),
            "sampling_decode_gpu_s": round(decode_s), "dpo_tokens_per_pair": round(2 * seq),
            "dpo_gpu_s": round(dpo_s), "total_gpu_s": round(prefill_s + decode_s + dpo_s),
            "dpo_wall_s_on_4_gpus": round(dpo_s / 4), "assumptions": ASSUMPTIONS, "model": PAPER_MODEL}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="copies of the 4 Antidote rows (x 4 query types)")
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--dpo-batch", type=int, default=2)
    args = ap.parse_args()
    load0 = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-pairs-dpo-")
    result: dict = {"date": date.today().isoformat(), "config": vars(args), "machine": machine()}
    result["pairs"] = pairs_run(work, args.copies)
    result["dpo"] = dpo_run(work, result["pairs"]["output"], args.dpo_steps, args.dpo_batch)
    result["paper_estimate_per_1000_pairs"] = paper_estimate(result["pairs"])
    result["loadavg_start"], result["loadavg_end"] = load0, os.getloadavg()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"pairs_dpo-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("pairs", "dpo", "paper_estimate_per_1000_pairs")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
