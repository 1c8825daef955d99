"""Scaling benchmark: rows/s of each pipeline's model stages on 1, 2, 4 and 8 (fake) GPUs,
scaling efficiency, the bottleneck stage, and the GPU count per stage for a target rate.

What it measures
----------------
No model runs here. Each model stage (actor stage) of the **paper** profile of antidote,
mmgen and mirror (MIRROR-LLaVA training is not a Ray Data pipeline and is left out) is
replaced by a stand-in actor that sleeps, for each block it gets, the sum of the stage's
per-batch times over the recipe's batches of that block, taken from a *latency model*
(``LATENCY``: a published figure or one of this repo's measurements, each with its source;
numbers without one are marked ``assumption``):

- GPU stages: ``batch seconds = fixed_s + per_row_s x rows`` on one A100-class GPU;
- the vLLM-served LLM (MIRROR expressions): ``rows x output tokens / tokens_per_s`` of one
  vLLM replica on one GPU;
- API stages (deepseek-chat, gpt-4o, gpt-4o-mini): not GPU stages. Network latency with a
  concurrency limit: ``ceil(rows / max_concurrency) x (ttft_s + max_tokens / tokens_per_s)``,
  at least ``rows / qps`` (``max_concurrency`` and ``qps`` per actor from the recipe). They
  are counted as client actors (concurrency slots), never as GPUs;
- CPU stages (MIRROR's face pool: DeepFace on CPU in the paper recipe): measured CPU time.

Every sleep is multiplied by one time-scale factor (``--time-scale``, default 0.04) so that
the run fits; all rates are converted back to real seconds (stub rows/s x factor). The
stand-in actors run in a Ray Data ``ActorPoolStrategy(size=k)`` pool with ``num_gpus=1,
num_cpus=0`` on a private cluster that declares fake GPUs (Ray does not check that they
exist; ``num_cpus=0`` because a GPU map stage reserves one CPU per actor by default, which
deadlocks a 2-CPU box). Pools are fully started before the first block
(``DataContext.wait_for_min_actors_s``), so actor start-up is not in the rates.

Runs
----
1. **Each model stage alone** at k = ``--k`` actors (default 1, 2, 4, 8; API stages at
   ``--api-k``, default 1): blocks hold ``--block-s`` seconds of scaled work (>= 1-2 s, see
   ``/work/shared/notes/scale.md`` section 2), ``--blocks-per-actor`` blocks per actor.
   Stages with the same k run side by side in one Ray Data execution (a union of
   independent branches, each with its own pool, at most ``--max-actors`` actors and
   ``--max-branches`` stages at once)
   to save actor start-up and wall time; they share only the driver's scheduler.
   Figures per stage and k: Ray Data's own per-operator table (``jobs.core.stats.stage_table``,
   copied as is into the JSON), op-level rows/s (its ``rows_per_s``: rows / (last task end -
   first task start)), a steady-state rate from the timestamps the stub writes into each
   row (rows completed after every actor finished its first block, over the time from then
   to the last completion), the scaling efficiency = rate / (k x rate at k=1), and
   ``vs_model_op`` = rate / (k x the latency model's one-actor rate) (<= 1: Ray's overhead).
2. **CPU-bound control**: the same stub burning thread CPU instead of sleeping, k = ``--k``:
   on 2 cores it stops scaling (about 1.8x one actor on a quiet box, less when other
   processes hold the cores); this is what "not scaling" looks like.
3. **Each pipeline end to end**: its row stages chained in plan order (one chain per MIRROR
   phase; MM-GEN's CLIP partition is an ingest stage over other rows and is only measured
   alone), k actors per model stage for k in ``--e2e-k`` (default 1, 2: each actor is a
   process of about 200 MB and up to 8 model stages are chained), blocks of the chain's
   largest batch size, enough rows that the slowest stage has ``--e2e-s`` scaled seconds of
   work per actor. End-to-end rows/s = rows / (first batch start -> last batch end), so
   pipeline fill and drain are included (a steady rate from the last stage's completions
   after its first k blocks is reported too); predicted = the slowest stage alone at the same k (API stages, measured at
   k=1 only, are estimated with the sleeping stubs' median efficiency); pipeline efficiency =
   measured / predicted.

Balanced pipeline: for ``--target-rows-per-s`` (real rows/s of each phase's rows, default 1)
the actor count per stage is the smallest n with ``n x rate1 x eff(n) >= target``, with
``eff`` interpolated from the measured op-level efficiencies (the last measured value beyond
the largest k, marked ``extrapolated``). API stages use the median efficiency of the sleeping
stubs at that n and report the request and token rate the API account must allow.

Usage::

    export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled KERAS_BACKEND=torch OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python benchmarks/scale.py [--k 1,2,4,8] [--e2e-k 1,2] [--time-scale 0.04]
        [--target-rows-per-s 1] [--pipelines antidote,mmgen,mirror]

Writes ``benchmarks/results/scale-<date>.json`` and ``.png`` (efficiency and rows/s vs
GPUs per stage, balanced GPU counts, end-to-end measured vs predicted) and prints a table.
The run takes 9-14 minutes on the shared 2-core box, depending on its load (mostly
starting ~300 actor processes). ``--from-json benchmarks/results/scale-<date>.json --target-rows-per-s 5``
recomputes the balanced counts, table and plot for another target without running anything
(written under ``--out``, same file names, with a ``reanalysed`` entry).

How to read it
--------------
``eff`` near 1.0 means the stage's rate grows linearly with GPUs (sleep stubs should show
0.85-1.0; lower values at k=8 are Ray's per-block dispatch overhead on this loaded 2-core
box, magnified by 1/time-scale when converted to real seconds, so they are a lower bound).
The CPU control's eff falls towards 2/k. The bottleneck is the stage with the lowest rate
per actor; the balanced counts say how many GPUs (or API slots) each stage needs so that no
stage holds the others back at the target rate: that is the cluster to provision. The
numbers are only as good as the latency models: swap in your own measured per-batch times
(``LATENCY``) to size a real cluster.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timezone

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import HERE, ROOT  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

PIPELINES = ("antidote", "mmgen", "mirror")

# ------------------------------------------------------------------ latency models
# Per model (resolved model id of the paper profile) and kind. Seconds are real seconds on one
# GPU (A100 class) unless said otherwise. "basis": published | repo measurement | assumption.
A100_BF16_TFLOPS = 312.0  # NVIDIA A100 datasheet, dense bf16/fp16 tensor peak
LATENCY: dict[str, dict] = {
    # ---- GPU stages
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "kind": "gpu", "fixed_s": 0.0, "per_row_s": 4.8, "basis": "published (as quoted in the issue)",
        "source": "issue 11: 'SD3-medium ~ 4.8 s/image on an A100' (1024x1024, 28 steps, CFG; recipe: "
                  "28 steps, guidance 7.5, fp16). Batched images assumed to cost the same per image "
                  "(a 1024 px MMDiT batch saturates an A100)."},
    "SG161222/RealVisXL_V3.0": {
        "kind": "gpu", "fixed_s": 0.0, "per_row_s": 5.93, "basis": "published",
        "source": "fal-ai/stable-diffusion-benchmarks (A100 80GB SXM): SDXL 1024x1024, 50 steps, Diffusers "
                  "torch 2.1 SDPA: 5.932 s mean (8.43 it/s). RealVisXL V3.0 is an SDXL fine-tune generated at "
                  "1024 px then resized to 336 (actors/identity_t2i.py); PhotoMaker's ID encoder is not "
                  "included. Baseten reports 8-10 s out of the box on an A100, so this is optimistic."},
    "IDEA-Research/grounding-dino-base": {
        "kind": "gpu", "fixed_s": 0.05, "per_row_s": 0.10, "basis": "assumption",
        "source": "assumption: about 10 images/s for Grounding DINO Swin-B at 800 px on an A100 in PyTorch "
                  "(+0.05 s per batch for pre/post-processing). No published per-image figure for this "
                  "setting was found; replace with a measurement."},
    "BAAI/bge-m3": {
        "kind": "gpu", "fixed_s": 0.02, "per_row_s": 0.0005, "basis": "assumption (FLOPs estimate)",
        "source": "assumption from FLOPs: XLM-R large 568M params x 2 x ~32 tokens per caption = 36 GFLOP/row "
                  "at 25% of 312 TFLOPS = 0.46 ms/row, rounded to 0.5 ms; +0.02 s per batch (tokenizer, "
                  "transfer)."},
    "openai/clip-vit-large-patch14": {
        "kind": "gpu", "fixed_s": 0.05, "per_row_s": 0.005, "basis": "assumption (FLOPs estimate)",
        "source": "assumption: ViT-L/14 image tower ~162 GFLOP/image (open_clip model profile, 81 GMACs) at 30% "
                  "of 312 TFLOPS = 1.7 ms, plus ~3 ms image decode/resize on the actor's CPU; +0.05 s per batch."},
    "openai/clip-vit-base-patch32": {
        "kind": "gpu", "fixed_s": 0.03, "per_row_s": 0.003, "basis": "assumption",
        "source": "assumption: ViT-B/32 is ~9 GFLOP/image (negligible on an A100); the ~3 ms/image of PNG "
                  "decode and resize on the actor's CPU dominates; +0.03 s per batch."},
    "Falconsai/nsfw_image_detection": {
        "kind": "gpu", "fixed_s": 0.03, "per_row_s": 0.003, "basis": "assumption",
        "source": "assumption: ViT-B/16 at 224 px ~35 GFLOP/image (0.4 ms at 30% of peak); ~3 ms/image CPU "
                  "decode/resize dominates; +0.03 s per batch."},
    "shahules786/Safetybot-T5-base": {
        "kind": "gpu", "fixed_s": 0.05, "per_row_s": 0.003, "basis": "assumption",
        "source": "assumption: T5-base (220M) over ~128 input tokens and a few label tokens per row: "
                  "~3 ms/row batched; +0.05 s per batch (generate loop, tokenizer)."},
    "llava-hf/llava-1.5-7b-hf": {
        "kind": "gpu", "fixed_s": 0.05, "per_row_s": 0.11, "basis": "assumption (FLOPs estimate)",
        "source": "assumption from FLOPs: one forward pass (loss) over ~1000 tokens (576 image tokens + "
                  "question/answer) x 7B params x 2 = 14 TFLOP/sample at 40% of 312 TFLOPS = 0.11 s; "
                  "+0.05 s per batch."},
    "VGG-Face": {  # MIRROR face_check (num_gpus 0.25 in the paper recipe)
        "kind": "gpu", "fixed_s": 0.05, "per_row_s": 0.05, "basis": "assumption",
        "source": "assumption: OpenCV Haar detection on the actor's CPU (~30 ms at 336 px) + VGG-Face "
                  "embedding on the GPU (~15 GFLOP) ~ 50 ms/row; +0.05 s per batch."},
    # ---- CPU stage (paper recipe: face_pool has num_gpus 0)
    "VGG-Face@cpu": {
        "kind": "cpu", "fixed_s": 1.33, "per_row_s": 1.41, "basis": "repo measurement",
        "source": "benchmarks/results/faces-2026-11-29.json, backend deepface, direct, 1 thread on this 2-core "
                  "box (load ~7): batch 4 -> 0.574 img/s (6.97 s/batch), batch 8 -> 0.635 img/s (12.6 s/batch); "
                  "linear fit fixed 1.33 s + 1.41 s/image. Counted as CPU actors (1 CPU each), not GPUs."},
    # ---- GPU served LLM (vLLM replica per GPU)
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "kind": "vllm", "tokens_per_s": 495.0, "basis": "published",
        "source": "johnmusgrave.com 'vLLM throughput-latency sweep on NVIDIA A100': Llama-3.1-8B-Instruct "
                  "BF16 on one A100 40GB, 1024 in / 128 out: 75 tokens/s at concurrency 1 and 6.6x that at "
                  "concurrency 8 (the knee) = 495 tokens/s per GPU. Tokens per row = the recipe's max_tokens "
                  "(128; an upper bound). One stand-in actor = one vLLM replica on one GPU."},
    # ---- API stages: network latency with a concurrency limit (not GPUs)
    "deepseek-chat": {
        "kind": "api", "ttft_s": 1.07, "tokens_per_s": 50.0, "basis": "published (third-party measurements)",
        "source": "Artificial Analysis (LinkedIn post, Jan 2025): DeepSeek API output speed fell from ~85 to "
                  "~50 tokens/s after the V3 launch; time to first token 1.07 s from zenmux.ai's deepseek-chat "
                  "provider card (Oct 2025). Tokens per row = the stage's max_tokens (upper bound)."},
    "deepseek-coder": {
        "kind": "api", "ttft_s": 1.07, "tokens_per_s": 50.0, "basis": "assumption",
        "source": "assumption: served like deepseek-chat (same figures); tokens per row = max_tokens."},
    "gpt-4o": {
        "kind": "api", "ttft_s": 0.39, "tokens_per_s": 81.0, "basis": "published",
        "source": "artificialanalysis.ai, GPT-4o (May '24) providers: OpenAI 81 output tokens/s, TTFT 0.39 s. "
                  "Tokens per row = the stage's max_tokens (4096: an upper bound; MM-GEN replies are shorter)."},
    "gpt-4o-mini": {
        "kind": "api", "ttft_s": 0.39, "tokens_per_s": 59.0, "basis": "published (speed); assumption (TTFT)",
        "source": "community.openai.com 'Inference speed of different models' (tacho, 2025): gpt-4o-mini "
                  "59.0 tokens/s average over 500-token replies; TTFT assumed equal to GPT-4o's 0.39 s. "
                  "Tokens per row = the stage's max_tokens."},
}
CPU_CONTROL = {"batch_size": 8, "cpu_s_per_batch": 0.1, "batches_per_block": 10, "blocks_per_actor": 2}


def load_latency(path: str) -> dict[str, dict]:
    """Latency models measured by ``benchmarks/gpu_stages.py`` (its JSON's ``latency``: model id
    -> ``kind``, ``fixed_s``, ``per_row_s``, ``basis``, ``source``), without failed entries."""
    with open(path) as f:
        doc = json.load(f)
    return {model: m for model, m in doc["latency"].items() if "error" not in m and not m.get("tiny")}


def stage_kind(sp) -> str:
    """api | vllm | gpu | cpu for a planned actor stage (see ``LATENCY``): an LLM stage on a
    shared vLLM engine is ``vllm`` (one stand-in actor = one replica on one GPU)."""
    spec = sp.resolved.spec
    if spec.backend == "vllm":
        return "vllm"
    if spec.backend == "openai":
        base = str(spec.options.get("base_url", "") or "")
        return "vllm" if ("localhost" in base or "127.0.0.1" in base) else "api"
    return "gpu" if sp.cfg.num_gpus > 0 else "cpu"


def latency_model(pipeline: str, phase: str, sp) -> dict:
    """The stage's latency model: kind, formula parameters, sources, recipe settings."""
    kind = stage_kind(sp)
    model = sp.resolved.spec.model
    key = f"{model}@cpu" if kind == "cpu" else model
    if key not in LATENCY:
        raise SystemExit(f"no latency model for stage {sp.stage.name!r} (model {model!r}, kind {kind}): "
                         "add one to LATENCY with its source")
    facts = dict(LATENCY[key])
    if facts["kind"] != kind:
        raise SystemExit(f"stage {sp.stage.name!r}: latency model kind {facts['kind']} != plan kind {kind}")
    params = sp.stage.merged(sp.cfg.params) if hasattr(sp.stage, "merged") else dict(sp.cfg.params)
    opts = sp.resolved.spec.options or {}
    m = {"pipeline": pipeline, "phase": phase, "stage": sp.stage.name, "kind": kind, "model": model,
         "backend": sp.resolved.spec.backend, "batch_size": sp.cfg.batch_size,
         "recipe_num_gpus": sp.cfg.num_gpus, "recipe_num_cpus": sp.cfg.num_cpus,
         "recipe_pool": list(sp.cfg.pool_bounds()), "ingest": bool(sp.ingest), **facts}
    if kind in ("api", "vllm"):
        m["tokens_per_row"] = int(params.get("max_tokens") or 256)
    if kind == "api":
        m["max_concurrency"] = int(opts.get("max_concurrency", 1))
        m["qps"] = float(opts.get("qps", 0) or 0)
        m["formula"] = "ceil(n/max_concurrency) x (ttft_s + tokens_per_row/tokens_per_s), >= n/qps"
    elif kind == "vllm":
        m["formula"] = "n x tokens_per_row / tokens_per_s"
    else:
        m["formula"] = "fixed_s + per_row_s x n"
    m["real_batch_s"] = round(batch_seconds(m, m["batch_size"]), 4)
    m["real_rows_per_s_one_actor"] = round(m["batch_size"] / m["real_batch_s"], 4)
    return m


def batch_seconds(m: dict, n: int) -> float:
    """Real seconds one actor takes for a batch of ``n`` rows under latency model ``m``."""
    if m["kind"] == "api":
        t = math.ceil(n / m["max_concurrency"]) * (m["ttft_s"] + m["tokens_per_row"] / m["tokens_per_s"])
        return max(t, n / m["qps"]) if m["qps"] else t
    if m["kind"] == "vllm":
        return n * m["tokens_per_row"] / m["tokens_per_s"]
    return m["fixed_s"] + m["per_row_s"] * n


# ------------------------------------------------------------------ stand-in actors

def block_seconds(m: dict, n: int) -> float:
    """Real seconds for ``n`` rows cut into the recipe's batches (``batch_size``, last one short)."""
    full, rest = divmod(n, m["batch_size"])
    return full * batch_seconds(m, m["batch_size"]) + (batch_seconds(m, rest) if rest else 0.0)


def make_stub(name: str, m: dict, scale: float, cpu_burn: bool = False):
    """A callable class named after the stage (so the Ray Data operator is ``MapBatches(<name>)``)
    that sleeps the model's scaled time for the rows it gets (or burns that much thread CPU) and
    appends the call's start/end timestamps to every row.

    It is called once per block (``batch_size`` = the block's rows) and sleeps the sum of the recipe's
    per-batch times for the block's rows (``block_seconds``): the same latency as one call per
    batch, without thousands of tiny sleeps for fast stages, whose per-call overhead would make
    the stub CPU-bound on this 2-core box and disturb every other measurement."""
    model = dict(m)

    class Stub:
        def __init__(self):
            self.deadline = 0.0

        def __call__(self, batch: pa.Table) -> pa.Table:
            n = batch.num_rows
            t0 = time.time()
            if cpu_burn:
                c0 = time.thread_time()
                budget = math.ceil(n / model["batch_size"]) * model["cpu_s_per_batch"]
                x = 0
                while time.thread_time() - c0 < budget:
                    x += sum(range(2000))
            else:
                # Pace against an absolute deadline: a late wake-up on the loaded box is made up by
                # the next sleep. An idle gap (waiting for the next block) restarts the pacing, so
                # Ray's dispatch delays stay in the measurement.
                self.deadline = max(self.deadline, t0) + scale * block_seconds(model, n)
                wait = self.deadline - time.time()
                if wait > 0:
                    time.sleep(wait)
            t1 = time.time()
            return (batch.append_column(f"{name}__t0", pa.array(np.full(n, t0)))
                    .append_column(f"{name}__t1", pa.array(np.full(n, t1))))

    Stub.__name__ = Stub.__qualname__ = name
    return Stub


def source(n_rows: int, block_rows: int, offset: int = 0):
    """Input blocks built in the driver (no read tasks): ``id`` column, ``block_rows`` per block."""
    import ray.data

    tables = []
    for lo in range(0, n_rows, block_rows):
        hi = min(n_rows, lo + block_rows)
        tables.append(pa.table({"id": np.arange(offset + lo, offset + hi, dtype=np.int64)}))
    return ray.data.from_arrow(tables)


def add_stub(ds, name: str, m: dict, k: int, scale: float, block_rows: int, cpu_burn: bool = False):
    """Map the stand-in of model ``m`` over ``ds`` in a pool of ``k`` actors, one call per block of
    ``block_rows`` rows (Ray Data requires a batch size for GPU stages)."""
    import ray.data

    gpus = 1 if m.get("kind") in ("gpu", "vllm") else 0
    # one call per block; the stub accounts for the recipe's batches itself
    return ds.map_batches(make_stub(name, m, scale, cpu_burn), batch_size=block_rows, batch_format="pyarrow",
                          num_gpus=gpus, num_cpus=0, compute=ray.data.ActorPoolStrategy(size=k),
                          zero_copy_batch=True)


def timestamps(ds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stage: (start, end) timestamp arrays, one entry per row, from the stubs' columns."""
    import ray

    out: dict[str, list] = {}
    for ref in ds.to_arrow_refs():
        t = ray.get(ref)
        for c in t.column_names:
            if c.endswith("__t0"):
                name = c[:-4]
                out.setdefault(name, [[], []])
                out[name][0].append(t.column(c).to_numpy())
                out[name][1].append(t.column(name + "__t1").to_numpy())
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def steady_rate(t1: np.ndarray, first_rows: int) -> float | None:
    """Rows/s after the first ``first_rows`` rows are done (the first block of each of the k
    actors: pool warm-up and pipeline fill excluded): rows completed after that moment divided
    by the time from it to the last completion. ``t1``: per-row completion times."""
    t = np.sort(t1)
    i = first_rows - 1
    if i < 0 or i >= len(t) - 1 or t[-1] <= t[i]:
        return None
    return float((len(t) - 1 - i) / (t[-1] - t[i]))


def run_ds(ds):
    """Execute ``ds``; returns (materialized dataset, wall seconds, start timestamp)."""
    t = time.time()
    mat = ds.materialize()
    return mat, time.time() - t, t


def op_rows(table: list[dict]) -> dict[str, dict]:
    """``stage_table`` rows of the stand-in operators by stage name. Exact ``MapBatches(<stage>)``
    match: a union's ``UnionOperator(MapBatches(a), MapBatches(b))`` row (0 rows of its own)
    also names the stages and must not stand for them."""
    return {r["stages"][0]: r for r in table if len(r["stages"]) == 1
            and r["operator"] == f"MapBatches({r['stages'][0]})"}


# ------------------------------------------------------------------ planning

def plan_pipelines(names: list[str]) -> dict:
    """Actor stages of each pipeline's paper profile, in plan order, by phase (no model loaded)."""
    from jobs.core import driver
    from jobs.core.recipe import load_recipe

    out = {}
    for name in names:
        mod = importlib.import_module(f"jobs.{name}")
        recipe = load_recipe(mod.RECIPE, name, "paper")
        p = driver.plan(mod, recipe)
        phases = {}
        for ph in driver.phases_of(mod):
            ingest = [sp for sp in p.stages if sp.phase == ph.name and sp.ingest and sp.stage.is_actor]
            rows = [sp for sp in p.row_stages(ph.name) if sp.stage.is_actor]
            if ingest or rows:
                phases[ph.name] = {"ingest": [latency_model(name, ph.name, sp) for sp in ingest],
                                   "chain": [latency_model(name, ph.name, sp) for sp in rows]}
        out[name] = {"recipe_block_rows": recipe.block_rows, "phases": phases}
    return out


# ------------------------------------------------------------------ runs

def stage_alone_runs(models: list[dict], ks: list[int], api_ks: list[int], args, log) -> dict:
    """Each stage alone at each k; stages of the same k side by side (union), <= max_actors."""
    from jobs.core.stats import stage_table

    results: dict[str, dict] = {m["stage"]: {} for m in models}
    all_k = sorted(set(ks) | set(api_ks))
    for k in all_k:
        todo = [m for m in models if k in (api_ks if m["kind"] == "api" else ks)]
        groups, cur = [], []
        for m in todo:
            if cur and ((len(cur) + 1) * k > args.max_actors or len(cur) >= args.max_branches):
                groups.append(cur)
                cur = []
            cur.append(m)
        if cur:
            groups.append(cur)
        for g, group in enumerate(groups):
            branches, layout = [], {}
            offset = 0
            for m in group:
                scaled = args.time_scale * batch_seconds(m, m["batch_size"])
                nb = max(1, math.ceil(args.block_s / scaled))
                block_rows = nb * m["batch_size"]
                n_rows = block_rows * args.blocks_per_actor * k
                layout[m["stage"]] = {"block_rows": block_rows, "blocks": args.blocks_per_actor * k,
                                      "rows": n_rows, "scaled_block_s": round(nb * scaled, 3)}
                branches.append(add_stub(source(n_rows, block_rows, offset), m["stage"], m, k, args.time_scale,
                                         block_rows))
                offset += n_rows
            ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
            load = os.getloadavg()
            mat, wall, t_exec = run_ds(ds)
            table = stage_table(mat, [m["stage"] for m in group])
            ts = timestamps(mat)
            pool_start = min(v[0].min() for v in ts.values()) - t_exec
            by_op = op_rows(table)
            for m in group:
                row = by_op.get(m["stage"])
                t0, t1 = ts.get(m["stage"], (np.array([]), np.array([])))
                steady = steady_rate(t1, k * layout[m["stage"]]["block_rows"])
                ideal = k * m["real_rows_per_s_one_actor"]
                results[m["stage"]][k] = {
                    "k": k, "group": f"k{k}-g{g}", "group_stages": [x["stage"] for x in group],
                    **layout[m["stage"]],
                    "stage_table": [row] if row else [],
                    "pool_startup_s": round(pool_start, 2),
                    "stub_rows_per_s_op": row["rows_per_s"] if row else None,
                    "stub_rows_per_s_steady": round(steady, 3) if steady else None,
                    "rows_per_s_real_op": round(row["rows_per_s"] * args.time_scale, 5) if row else None,
                    "rows_per_s_real_steady": round(steady * args.time_scale, 5) if steady else None,
                    "model_rows_per_s_real": round(ideal, 5),
                    "vs_model_op": round(row["rows_per_s"] * args.time_scale / ideal, 3) if row else None,
                    "execution_wall_s": round(wall, 2), "load_avg_1m": round(load[0], 2),
                }
            log(f"alone k={k} group {g + 1}/{len(groups)} ({len(group)} stages, {len(group) * k} actors): "
                f"{wall:.1f} s (pools started in {pool_start:.1f} s), load {load[0]:.1f}")
    for name, per_k in results.items():
        base = per_k.get(1)
        for k, r in per_k.items():
            for key, src in (("eff_op", "rows_per_s_real_op"), ("eff_steady", "rows_per_s_real_steady")):
                r[key] = (round(r[src] / (k * base[src]), 3)
                          if base and r[src] and base[src] else None)
    return results


def cpu_control_runs(ks: list[int], args, log) -> dict:
    from jobs.core.stats import stage_table

    c = CPU_CONTROL
    m = {"kind": "cpu_control", "batch_size": c["batch_size"], "cpu_s_per_batch": c["cpu_s_per_batch"]}
    block_rows = c["batch_size"] * c["batches_per_block"]
    out = {}
    for k in ks:
        n_rows = block_rows * c["blocks_per_actor"] * k
        ds = add_stub(source(n_rows, block_rows), "cpu_control", m, k, 1.0, block_rows, cpu_burn=True)
        load = os.getloadavg()
        mat, wall, _ = run_ds(ds)
        table = stage_table(mat, ["cpu_control"])
        steady = steady_rate(timestamps(mat)["cpu_control"][1], k * block_rows)
        out[k] = {"k": k, "rows": n_rows, "block_rows": block_rows, "stage_table": table,
                  "rows_per_s_op": table[0]["rows_per_s"] if table else None,
                  "rows_per_s_steady": round(steady, 3) if steady else None,
                  "execution_wall_s": round(wall, 2), "load_avg_1m": round(load[0], 2)}
        log(f"cpu control k={k}: {out[k]['rows_per_s_op']} rows/s op, {wall:.1f} s, load {load[0]:.1f}")
    for k, r in out.items():
        for key, src in (("eff_op", "rows_per_s_op"), ("eff_steady", "rows_per_s_steady")):
            b = out.get(1, {}).get(src)
            r[key] = round(r[src] / (k * b), 3) if b and r[src] else None
    return out


def e2e_runs(chains: dict[str, list[dict]], ks: list[int], args, log) -> dict:
    """Each chain at k actors per model stage. Rows: enough blocks that the slowest stage (by
    its latency model) has >= ``--e2e-s`` scaled seconds of work per actor, and at least
    ``--e2e-blocks-per-actor`` blocks per actor."""
    from jobs.core.stats import stage_table

    out: dict[str, dict] = {}
    for chain_name, models in chains.items():
        out[chain_name] = {}
        block_rows = max(m["batch_size"] for m in models)
        slowest = max(args.time_scale * block_seconds(m, block_rows) for m in models)
        blocks_per_actor = max(args.e2e_blocks_per_actor, math.ceil(args.e2e_s / slowest))
        for k in ks:
            n_rows = block_rows * blocks_per_actor * k
            ds = source(n_rows, block_rows)
            for m in models:
                ds = add_stub(ds, m["stage"], m, k, args.time_scale, block_rows)
            load = os.getloadavg()
            mat, wall, t_exec = run_ds(ds)
            names = [m["stage"] for m in models]
            table = stage_table(mat, names)
            ts = timestamps(mat)
            first, last = ts[names[0]][0].min(), ts[names[-1]][1].max()
            steady = steady_rate(ts[names[-1]][1], k * block_rows)
            by_op = op_rows(table)
            r = {"k": k, "rows": n_rows, "block_rows": block_rows, "blocks_per_actor": blocks_per_actor,
                 "stage_table": table,
                 "e2e_rows_per_s_real": round(n_rows / (last - first) * args.time_scale, 5),
                 "e2e_steady_rows_per_s_real": round(steady * args.time_scale, 5) if steady else None,
                 "first_start_to_last_end_s_scaled": round(last - first, 3),
                 "materialize_wall_s": round(wall, 2), "pool_startup_s": round(first - t_exec, 2),
                 "load_avg_1m": round(load[0], 2),
                 "in_chain_op_rows_per_s_real": {s: round(by_op[s]["rows_per_s"] * args.time_scale, 5)
                                                 for s in names if s in by_op}}
            out[chain_name][k] = r
            log(f"e2e {chain_name} k={k}: {r['e2e_rows_per_s_real']} rows/s real ({n_rows} rows), "
                f"{wall:.1f} s (pools started in {first - t_exec:.1f} s), load {load[0]:.1f}")
    return out


def median_eff(alone: dict) -> dict[int, float]:
    """Median op-level efficiency of the swept sleeping stubs per k (used for unswept stages)."""
    effs: dict[int, list[float]] = {}
    for per_k in alone.values():
        if len(per_k) < 2:
            continue
        for k, r in per_k.items():
            if r.get("eff_op"):
                effs.setdefault(k, []).append(r["eff_op"])
    out = {k: round(statistics.median(v), 3) for k, v in sorted(effs.items())}
    out.setdefault(1, 1.0)
    return out


def stage_rate(stage: str, k: int, alone: dict, stub_median: dict[int, float]) -> tuple[float | None, bool]:
    """Real rows/s of ``stage`` alone at k actors: measured, else k x (rate at k=1) x the stubs'
    median efficiency at k (API stages are measured at k=1 only). (rate, estimated)."""
    per_k = alone.get(stage, {})
    r = (per_k.get(k) or {}).get("rows_per_s_real_op")
    if r:
        return r, False
    r1 = (per_k.get(1) or {}).get("rows_per_s_real_op")
    if not r1:
        return None, True
    e, _ = eff_at(stub_median, k)
    return round(k * r1 * min(1.0, e), 5), True


def predict_e2e(e2e: dict, chains: dict[str, list[dict]], alone: dict, stub_median: dict[int, float]) -> None:
    """Add to each end-to-end record the slowest stage alone at the same k (its prediction)."""
    for chain_name, per_k in e2e.items():
        for k, r in per_k.items():
            rates = {m["stage"]: stage_rate(m["stage"], k, alone, stub_median) for m in chains[chain_name]}
            known = {s: v for s, (v, _) in rates.items() if v}
            bott = min(known, key=known.get) if known else None
            r["stage_rates_alone_real"] = {s: {"rows_per_s": v, "estimated": est} for s, (v, est) in rates.items()}
            r["bottleneck_stage"] = bott
            r["predicted_rows_per_s_real"] = known.get(bott) if bott else None
            r["predicted_is_estimated"] = rates[bott][1] if bott else None
            pred = r["predicted_rows_per_s_real"]
            r["pipeline_efficiency"] = round(r["e2e_rows_per_s_real"] / pred, 3) if pred else None
            r["pipeline_efficiency_steady"] = (round(r["e2e_steady_rows_per_s_real"] / pred, 3)
                                               if pred and r.get("e2e_steady_rows_per_s_real") else None)


# ------------------------------------------------------------------ analysis

def eff_at(curve: dict[int, float], n: int) -> tuple[float, bool]:
    """Efficiency at n actors, linearly interpolated between measured k; (value, extrapolated)."""
    ks = sorted(curve)
    if n in curve:
        return curve[n], False
    if n > ks[-1]:
        return curve[ks[-1]], True
    lo = max(k for k in ks if k < n)
    hi = min(k for k in ks if k > n)
    return curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo), False


def balance(m: dict, per_k: dict, target: float, stub_median_eff: dict[int, float]) -> dict:
    """Actors (GPUs for GPU stages) this stage needs to sustain ``target`` real rows/s."""
    r1 = (per_k.get(1) or {}).get("rows_per_s_real_op")
    if not r1:
        return {"error": "no k=1 measurement"}
    curve = {k: v["eff_op"] for k, v in per_k.items() if v.get("eff_op")}
    if m["kind"] == "api" or len(curve) < 2:
        curve = stub_median_eff  # API / unswept stages: the sleeping stubs' median efficiency
        basis = "median efficiency of the swept sleep stubs"
    else:
        basis = "this stage's measured op-level efficiency"
    n, extrapolated, e = 1, False, 1.0
    for n in range(1, 10000):
        e, extrapolated = eff_at(curve, n)
        if n * r1 * min(e, 1.0) >= target:
            break
    out = {"rate_one_actor_real": r1, "actors": n, "eff_used": round(e, 3), "eff_basis": basis,
           "extrapolated": extrapolated, "ideal_fraction": round(target / r1, 3),
           "rate_at_actors_real": round(n * r1 * min(e, 1.0), 4)}
    if m["kind"] in ("gpu", "vllm"):
        out["gpus"] = n  # one whole GPU per stand-in actor
        out["resource"] = "GPU" if m["kind"] == "gpu" else "GPU (vLLM replica)"
    elif m["kind"] == "cpu":
        out["cpus"] = n * max(1.0, m["recipe_num_cpus"])
        out["resource"] = "CPU actor"
    else:
        out["resource"] = "API client actor (concurrency slots), not a GPU"
        out["api_requests_per_s"] = target
        out["api_output_tokens_per_min"] = round(target * m["tokens_per_row"] * 60)
        out["api_concurrent_requests"] = n * m["max_concurrency"]
    return out


def analyse(plans: dict, alone: dict, e2e: dict, target: float, ks: list[int],
            stub_median: dict[int, float]) -> dict:
    """Per pipeline and phase: bottleneck, predicted end-to-end rate by k, measured end to end,
    and the balanced actor/GPU counts for ``target`` real rows/s."""
    out = {"stub_median_eff_op": stub_median}
    kmax = max(ks)
    for pipe, info in plans.items():
        pres = {}
        for phase, ph in info["phases"].items():
            rows = []
            for m in ph["chain"] + ph["ingest"]:
                per_k = alone.get(m["stage"], {})
                r1 = (per_k.get(1) or {}).get("rows_per_s_real_op")
                rk = (per_k.get(kmax) or {}).get("rows_per_s_real_op")
                rows.append({"stage": m["stage"], "kind": m["kind"], "ingest": m["ingest"],
                             "rows_per_s_real_k1": r1, f"rows_per_s_real_k{kmax}": rk,
                             f"eff_k{kmax}": (per_k.get(kmax) or {}).get("eff_op"),
                             "model_rows_per_s_one_actor": m["real_rows_per_s_one_actor"],
                             "balanced": balance(m, per_k, target, stub_median)})
            chain = [r for r in rows if not r["ingest"] and r["rows_per_s_real_k1"]]
            bott = min(chain, key=lambda r: r["rows_per_s_real_k1"]) if chain else None
            gpu_rows = [r for r in rows if r["kind"] in ("gpu", "vllm") and "gpus" in r["balanced"]]
            whole = sum(r["balanced"]["gpus"] for r in gpu_rows)
            # whole GPUs: stages whose recipe takes >= 1 GPU per actor, and vLLM replicas (the recipe's
            # expression actor is a client; the vLLM server it calls holds the GPU)
            whole_gpu = {m["stage"]: m["kind"] == "vllm" or m["recipe_num_gpus"] >= 1
                         for m in ph["chain"] + ph["ingest"]}
            packed = sum(r["balanced"]["gpus"] for r in gpu_rows if whole_gpu[r["stage"]]) + math.ceil(
                sum(r["balanced"]["ideal_fraction"] for r in gpu_rows if not whole_gpu[r["stage"]]))
            pred = {}
            for k in ks:
                vals = [stage_rate(r["stage"], k, alone, stub_median)[0] for r in chain]
                if vals and all(vals):
                    pred[k] = round(min(vals), 5)
            pres[phase] = {
                "stages": rows,
                "bottleneck_stage_one_actor": bott["stage"] if bott else None,
                "bottleneck_rows_per_s_real_k1": bott["rows_per_s_real_k1"] if bott else None,
                "predicted_e2e_rows_per_s_real_by_k": pred,
                "measured_e2e": {k: {x: v.get(x) for x in ("e2e_rows_per_s_real", "e2e_steady_rows_per_s_real",
                                                           "predicted_rows_per_s_real", "pipeline_efficiency",
                                                           "pipeline_efficiency_steady", "bottleneck_stage")}
                                 for k, v in e2e.get(f"{pipe}:{phase}", {}).items()},
                "balanced_for_target": {"target_rows_per_s": target, "gpus_whole": whole,
                                        "gpus_packed": packed,
                                        "api_actors": sum(r["balanced"].get("actors", 0) for r in rows
                                                          if r["kind"] == "api"),
                                        "cpu_actors": sum(r["balanced"].get("actors", 0) for r in rows
                                                          if r["kind"] == "cpu")},
            }
        out[pipe] = pres
    return out


# ------------------------------------------------------------------ output

def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alone, models = result["stage_alone"], result["latency_models"]
    ctrl = result["cpu_control"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    ax = axes[0][0]
    swept = [s for s, per_k in alone.items() if len(per_k) > 1]
    cmap = plt.get_cmap("tab20")
    for i, s in enumerate(swept):
        ks = sorted(int(k) for k in alone[s])
        ax.plot(ks, [alone[s][k]["eff_op"] or np.nan for k in ks], "o-", color=cmap(i % 20), lw=1.2, ms=4,
                label=f"{s} ({models[s]['pipeline']})")
    if ctrl:
        ks = sorted(int(k) for k in ctrl)
        ax.plot(ks, [ctrl[k]["eff_op"] or np.nan for k in ks], "s--", color="red", lw=2.5, label="CPU-bound control")
        ax.plot(ks, [min(1.0, 2 / k) for k in ks], ":", color="red", lw=1, label="2 cores / k")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8])
    ax.set_xticklabels(["1", "2", "4", "8"])
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("GPUs (stand-in actors) for the stage")
    ax.set_ylabel("scaling efficiency = rate / (k x rate at k=1)")
    ax.set_title("Each model stage alone: op-level efficiency (Ray Data stats)")
    ax.legend(fontsize=6.5, ncol=2, loc="lower left")

    ax = axes[0][1]
    for i, s in enumerate(swept):
        ks = sorted(int(k) for k in alone[s])
        ax.plot(ks, [alone[s][k]["rows_per_s_real_op"] or np.nan for k in ks], "o-", color=cmap(i % 20), lw=1.2, ms=4)
        ax.annotate(s, (ks[-1], alone[s][ks[-1]]["rows_per_s_real_op"]), fontsize=6.5,
                    xytext=(3, 0), textcoords="offset points", va="center")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8])
    ax.set_xticklabels(["1", "2", "4", "8"])
    ax.set_xlim(0.8, 16)
    ax.set_xlabel("GPUs (stand-in actors) for the stage")
    ax.set_ylabel("rows/s, real time (stub rate x time scale)")
    ax.set_title("Each model stage alone: rows/s vs GPUs")

    ax = axes[1][0]
    labels, vals, colors = [], [], []
    kind_color = {"gpu": "tab:blue", "vllm": "tab:purple", "api": "tab:orange", "cpu": "tab:green"}
    for pipe, phases in result["pipelines"].items():
        if pipe == "stub_median_eff_op":
            continue
        for phase, ph in phases.items():
            for r in ph["stages"]:
                b = r["balanced"]
                if "actors" not in b:
                    continue
                labels.append(f"{pipe}{'' if phase == 'rows' else ':' + phase} {r['stage']}")
                vals.append(b["actors"])
                colors.append(kind_color[r["kind"]])
    y = np.arange(len(labels))
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6.5)
    ax.invert_yaxis()
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v}", va="center", fontsize=6.5)
    ax.set_xlabel("actors needed (blue: GPUs, purple: vLLM GPUs, orange: API client actors, green: CPU actors)")
    ax.set_title(f"Balanced pipeline for {result['config']['target_rows_per_s']} rows/s (real) per phase")

    ax = axes[1][1]
    e2e = result["end_to_end"]
    names = list(e2e)
    width = 0.8 / max(1, 2 * len(result["config"]["e2e_k"]))
    for j, k in enumerate(result["config"]["e2e_k"]):
        meas = [(e2e[c].get(k) or {}).get("e2e_rows_per_s_real") or 0 for c in names]
        pred = [(e2e[c].get(k) or {}).get("predicted_rows_per_s_real") or 0 for c in names]
        x = np.arange(len(names))
        ax.bar(x + (2 * j) * width, meas, width, label=f"measured e2e, k={k}")
        ax.bar(x + (2 * j + 1) * width, pred, width, alpha=0.5, label=f"bottleneck alone, k={k}")
    ax.set_xticks(np.arange(len(names)) + width * (len(result["config"]["e2e_k"]) - 0.5))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("rows/s, real time")
    ax.set_title("End to end (k actors per model stage, fill and drain included)")
    ax.legend(fontsize=7)
    cfg = result["config"]
    loads = [r["load_avg_1m"] for per_k in list(alone.values()) + list(result["end_to_end"].values())
             for r in per_k.values() if "load_avg_1m" in r] + [r["load_avg_1m"] for r in ctrl.values()]
    fig.suptitle(f"mmsynth scaling benchmark {result['date']}: stand-in actors with per-stage latency models, "
                 f"time scale {cfg['time_scale']}, shared 2-core box (1-min load average "
                 f"{min(loads):.1f}-{max(loads):.1f} during the runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    ks = result["config"]["k"]
    alone = result["stage_alone"]
    print("\nEach model stage alone: op-level rows/s in REAL seconds (eff = rate / (k x rate at k=1))")
    hdr = f"{'pipeline:phase':<18}{'stage':<18}{'kind':<6}" + "".join(f"{'k=' + str(k):>16}" for k in ks)
    print(hdr)
    for s, m in result["latency_models"].items():
        per_k = alone.get(s, {})
        cells = []
        for k in ks:
            r = per_k.get(k)
            cells.append(f"{r['rows_per_s_real_op']:>9.4g} ({r['eff_op'] if r['eff_op'] else '-':>4})"
                          if r and r.get("rows_per_s_real_op") else f"{'-':>16}")
        print(f"{m['pipeline'] + ':' + m['phase']:<18}{s:<18}{m['kind']:<6}" + "".join(f"{c:>16}" for c in cells))
    ctrl = result["cpu_control"]
    if ctrl:
        print("CPU-bound control (stub rows/s, eff): " + ", ".join(
            f"k={k}: {ctrl[k]['rows_per_s_op']} ({ctrl[k]['eff_op']})" for k in sorted(ctrl)))
    print("\nEnd to end (k actors per model stage): measured rows/s vs the bottleneck stage alone (real)")
    for c, per_k in result["end_to_end"].items():
        for k, r in sorted(per_k.items()):
            steady = r.get("e2e_steady_rows_per_s_real")
            print(f"  {c:<18} k={k}: {r['e2e_rows_per_s_real']:.4g} measured ({steady} steady), "
                  f"{r['predicted_rows_per_s_real']} predicted ({r['bottleneck_stage']}"
                  f"{', estimated' if r.get('predicted_is_estimated') else ''}), pipeline eff "
                  f"{r['pipeline_efficiency']} ({r.get('pipeline_efficiency_steady')} steady)")
    t = result["config"]["target_rows_per_s"]
    print(f"\nBalanced pipeline for {t} rows/s (real) of each phase's rows")
    for pipe, phases in result["pipelines"].items():
        if pipe == "stub_median_eff_op":
            continue
        for phase, ph in phases.items():
            bal = ph["balanced_for_target"]
            parts = []
            for r in ph["stages"]:
                b = r["balanced"]
                unit = "GPU" if r["kind"] in ("gpu", "vllm") else ("API" if r["kind"] == "api" else "CPU")
                parts.append(f"{r['stage']}={b.get('actors')}{unit}{'*' if r['ingest'] else ''}")
            print(f"  {pipe + ':' + phase:<18} bottleneck {ph['bottleneck_stage_one_actor']} "
                  f"({ph['bottleneck_rows_per_s_real_k1']} rows/s per actor): GPUs {bal['gpus_whole']} whole "
                  f"({bal['gpus_packed']} packing fractional stages), API actors {bal['api_actors']}, "
                  f"CPU actors {bal['cpu_actors']}: " + ", ".join(parts))
    print("  (* ingest stage: counts its own rows, e.g. MM-GEN partition images)")


def int_keys(result: dict) -> dict:
    """Undo JSON's string keys for the per-k sections of a results document (in place)."""
    result["stage_alone"] = {s: {int(k): v for k, v in per_k.items()} for s, per_k in result["stage_alone"].items()}
    result["cpu_control"] = {int(k): v for k, v in result["cpu_control"].items()}
    result["end_to_end"] = {c: {int(k): v for k, v in per_k.items()} for c, per_k in result["end_to_end"].items()}
    return result


def plans_from_models(models: dict[str, dict]) -> dict:
    """The ``plan_pipelines`` shape rebuilt from the latency models (kept in plan order)."""
    plans: dict = {}
    for m in models.values():
        phases = plans.setdefault(m["pipeline"], {"phases": {}})["phases"]
        ph = phases.setdefault(m["phase"], {"ingest": [], "chain": []})
        ph["ingest" if m["ingest"] else "chain"].append(m)
    return plans


NOTES = [
    "Rates are in real seconds: stub rows/s x time_scale. Ray's per-block and per-hop overheads are real time "
    "too, so converting them by 1/time_scale overstates them: efficiencies here are lower bounds.",
    "Stages of the same k run side by side in one Ray Data execution (union of independent branches, each "
    "with its own actor pool); they share only the driver's scheduler.",
    "The stand-in is called once per block and sleeps the sum of the recipe's per-batch times for that "
    "block (same latency as one call per batch, without per-call overhead that would make fast stubs "
    "CPU-bound on 2 cores).",
    "End-to-end e2e_rows_per_s_real includes pipeline fill and drain (rows / (first batch start -> last "
    "batch end)); e2e_steady_rows_per_s_real counts the last stage's completions after its first k blocks "
    "(fill excluded). The stubs do not filter rows, so every row reaches every stage (the real funnels "
    "drop some: the counts for later stages are upper bounds).",
    "API stages are not GPUs: they are client actors (max_concurrency requests each); their throughput is "
    "capped by the provider's rate limits (requests and tokens per minute), which this benchmark cannot "
    "see. They are measured at --api-k only; other k use the swept stubs' median efficiency (estimated).",
    "Balanced counts assume one whole GPU per actor at the latency model's per-GPU rate; stages whose "
    "recipe gives a fractional num_gpus can share GPUs (gpus_packed). Beyond the largest measured k the "
    "last measured efficiency is used (extrapolated: true).",
    "The CPU-bound control burns thread CPU; on this shared 2-core box its ceiling depends on what the "
    "other processes take (load_avg_1m per run).",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--k", default="1,2,4,8", help="actor counts for each GPU/CPU model stage alone")
    ap.add_argument("--api-k", default="1", help="actor counts for API stages alone (no GPU)")
    ap.add_argument("--e2e-k", default="1,2", help="actors per model stage in the end-to-end chains")
    ap.add_argument("--time-scale", type=float, default=0.04, help="stub sleep = real seconds x this")
    ap.add_argument("--block-s", type=float, default=1.5, help="scaled seconds of work per block (stage alone)")
    ap.add_argument("--blocks-per-actor", type=int, default=3, help="blocks per actor (stage alone)")
    ap.add_argument("--e2e-s", type=float, default=8.0,
                    help="scaled seconds of work per actor of the slowest stage in an end-to-end chain")
    ap.add_argument("--e2e-blocks-per-actor", type=int, default=2, help="at least this many blocks per actor")
    ap.add_argument("--max-actors", type=int, default=24, help="most stand-in actors alive at once")
    ap.add_argument("--max-branches", type=int, default=6,
                    help="most stages measured side by side in one execution (more branches: more "
                         "dispatch gaps per operator)")
    ap.add_argument("--target-rows-per-s", type=float, default=1.0, help="real rows/s to size the pipeline for")
    ap.add_argument("--no-control", action="store_true", help="skip the CPU-bound control")
    ap.add_argument("--from-json", help="recompute the analysis (e.g. another --target-rows-per-s), table and "
                    "plot from a results JSON of an earlier run; nothing is run")
    ap.add_argument("--latency", help="JSON of benchmarks/gpu_stages.py (measured on a GPU): replaces the "
                    "published or assumed per-batch times of the models it measured")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.latency:
        LATENCY.update(load_latency(args.latency))
    t_start = time.time()
    started = datetime.now(timezone.utc)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    if args.from_json:
        with open(args.from_json) as f:
            result = int_keys(json.load(f))
        models, alone, e2e = result["latency_models"], result["stage_alone"], result["end_to_end"]
        ks, day = result["config"]["k"], result["date"]
        result["config"]["target_rows_per_s"] = args.target_rows_per_s
        result["reanalysed"] = {"at": started.isoformat(), "command": sys.argv[1:]}
    else:
        ks = [int(x) for x in args.k.split(",") if x]
        api_ks = [int(x) for x in args.api_k.split(",") if x]
        e2e_ks = [int(x) for x in args.e2e_k.split(",") if x]
        if 1 not in ks or 1 not in api_ks:
            raise SystemExit("--k and --api-k must include 1 (efficiency is relative to one actor)")
        pipes = [p for p in args.pipelines.split(",") if p]
        load0 = os.getloadavg()
        plans = plan_pipelines(pipes)
        models = {m["stage"]: m for info in plans.values() for ph in info["phases"].values()
                  for m in ph["ingest"] + ph["chain"]}
        chains = {f"{p}:{ph}": v["chain"] for p, info in plans.items()
                  for ph, v in info["phases"].items() if v["chain"]}
        log(f"planned {len(models)} model stages of {', '.join(pipes)} (paper profile)")

        import ray
        from ray.data import DataContext

        # fake GPUs to declare: enough for the largest stage-alone group and the largest chain
        declared_gpus = max([8, max(ks), args.max_actors,
                             max(e2e_ks) * max(sum(1 for m in c if m["kind"] in ("gpu", "vllm"))
                                               for c in chains.values())])
        tmp = tempfile.mkdtemp(prefix="scale-ray-", dir="/tmp")
        ray.init(address="local", num_cpus=2, num_gpus=declared_gpus, include_dashboard=False, _temp_dir=tmp,
                 object_store_memory=1_000_000_000, log_to_driver=False)
        ctx = DataContext.get_current()
        ctx.wait_for_min_actors_s = 900  # start every actor of a pool before the first block
        ctx.enable_progress_bars = False
        ctx.per_stage_map_timing = True
        log(f"private Ray cluster up (2 CPUs, {declared_gpus} fake GPUs, temp dir {tmp})")
        try:
            alone = stage_alone_runs(list(models.values()), ks, api_ks, args, log)
            control = {} if args.no_control else cpu_control_runs(ks, args, log)
            e2e = e2e_runs(chains, e2e_ks, args, log)
        finally:
            ray.shutdown()
        log("Ray shut down")
        day = date.today().isoformat()
        result = {
            "benchmark": "scale",
            "date": day,
            "started": started.isoformat(),
            "wall_s": round(time.time() - t_start, 1),
            "command": [os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0],
                        *sys.argv[1:]],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "ray": ray.__version__, "gpu": None,
                        "load_avg_start": [round(x, 2) for x in load0],
                        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
            "config": {"pipelines": pipes, "profile": "paper", "k": ks, "api_k": api_ks, "e2e_k": e2e_ks,
                       "time_scale": args.time_scale, "block_s": args.block_s,
                       "blocks_per_actor": args.blocks_per_actor, "e2e_s": args.e2e_s,
                       "e2e_blocks_per_actor": args.e2e_blocks_per_actor, "max_actors": args.max_actors,
                       "max_branches": args.max_branches,
                       "target_rows_per_s": args.target_rows_per_s, "declared_fake_gpus": declared_gpus,
                       "ray_init_num_cpus": 2,
                       "stub_actor": "ActorPoolStrategy(size=k), num_gpus=1 (0 for API and CPU stages), "
                                     "num_cpus=0, one call per block",
                       "wait_for_min_actors_s": ctx.wait_for_min_actors_s,
                       "planning": "jobs.core.driver.plan on each pipeline's paper recipe (no model loaded; no API "
                                   "key needed: the plan only notes missing key variables)",
                       "cpu_control": CPU_CONTROL},
            "latency_models": models,
            "stage_alone": alone,
            "cpu_control": control,
            "end_to_end": e2e,
        }
    chains = {f"{p}:{ph}": v["chain"] for p, info in plans_from_models(models).items()
              for ph, v in info["phases"].items() if v["chain"]}
    stub_median = median_eff(alone)
    predict_e2e(e2e, chains, alone, stub_median)
    result["pipelines"] = analyse(plans_from_models(models), alone, e2e, args.target_rows_per_s, ks, stub_median)
    result["notes"] = NOTES
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"scale-{day}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(base + ".json") as f:  # plot and print what was written
        reloaded = int_keys(json.load(f))
    plot(reloaded, base + ".png")
    print_table(reloaded)
    log(f"written {base}.json and {base}.png")


if __name__ == "__main__":
    main()
