"""MIRROR-LLaVA throughput: LoRA training (samples/s, step time), Serve request latency, sessions/hour.

Measured in one run on this machine, offline profile (tiny LLaVA placeholder counselor base,
SmolLM2 client/describe, tiny PhotoMaker placeholder, dlib faces, tiny CLIP/NSFW
placeholders), so the figures measure the engine's overheads on CPU, not paper-scale models:

1. **training** — ``python -m jobs mirror-llava-data`` on a MIRROR run's output (default
   ``/tmp/mirror-demo``: the MIRROR demo's output), then ``python -m jobs mirror-llava-train``
   (Ray Train ``TorchTrainer``, 1 worker) for ``--train-steps`` steps; samples/s and median
   step time are the job's own manifest figures (first step excluded).
2. **Serve latency** — the Serve app started with the checkpoint of step 1 as the counselor
   (the LoRA plug-in of ``actors.llm_hf``); ``--requests`` sequential handle calls each of
   ``describe`` (SmolLM2 JSON reply), ``generate`` and ``verify`` (dlib + CLIP + NSFW) on a
   real face; p50/p95 of the client-side wall time. Sequential calls: latency, not capacity.
3. **sessions/hour** — ``jobs.mirror_llava.infer.infer`` over ``--sessions`` clients of the
   MIRROR run's ``mirror_data.csv`` (``--max-turns`` client turns, cot ``ec_planning``), 3600 ×
   finished sessions ÷ wall time of the Ray Data pipeline (app already running).

Writes ``benchmarks/results/mirror_llava-<date>.json`` (figures, configuration, machine, load
average at start and end). Usage: ``python benchmarks/mirror_llava.py [--mirror-out DIR]
[--train-steps 6] [--requests 10] [--sessions 2] [--max-turns 3]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import HERE, machine  # noqa: E402


from jobs.core import cli  # noqa: E402


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50/p95 (nearest rank), mean and count of latencies in seconds."""
    s = sorted(xs)
    rank = lambda q: s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]  # noqa: E731
    return {"n": len(s), "p50_s": round(rank(0.50), 3), "p95_s": round(rank(0.95), 3),
            "mean_s": round(statistics.fmean(s), 3)}


def train(mirror_out: str, work: str, steps: int, batch: int) -> dict:
    data = os.path.join(work, "data")
    if cli.main(["mirror-llava-data", "--input", mirror_out, "--output", data, "--cot", "ec_planning"]) != 0:
        raise SystemExit(f"mirror-llava-data failed on {mirror_out}")
    ckpt = os.path.join(work, "ckpt")
    t0 = time.time()
    if cli.main(["mirror-llava-train", "--data", os.path.join(data, "train.json"), "--output", ckpt,
                 "--max-steps", str(steps), "--batch-size", str(batch), "--save-steps", str(steps)]) != 0:
        raise SystemExit("mirror-llava-train failed")
    m = json.load(open(os.path.join(ckpt, "manifest.json")))
    return {"records": m["data"]["records"], "steps": m["steps_this_run"], "batch_size": batch,
            "samples_per_s": m["throughput"]["samples_per_s"], "step_s_median": m["throughput"]["step_s_median"],
            "step_s_first": m["throughput"]["step_s_first"], "job_wall_s": round(time.time() - t0, 1),
            "checkpoint": m["checkpoint"], "final_loss": (m["loss_curve"] or [{}])[-1].get("loss")}


def latency(handle, n: int) -> dict:
    from tests.conftest import SHARED

    face = open(f"{SHARED}/data/faces/face_recognition/obama.jpg", "rb").read()
    out: dict[str, list[float]] = {"describe": [], "generate": [], "verify": []}
    image = None
    for k in range(n):
        t = time.time()
        d = handle.describe.remote({"history": "Therapist: [smiles] How was your week?",
                                    "utterance": "Client: [frowns] Not great, I barely slept.", "gender": "Man",
                                    "sampling": {"seed": k}}).result()
        out["describe"].append(time.time() - t)
        t = time.time()
        g = handle.generate.remote({"source_image": face, "prompt": d.prompt, "negative_prompt": d.negative_prompt,
                                    "seed": k}).result()
        out["generate"].append(time.time() - t)
        import base64

        image = base64.b64decode(g.image_png_b64)
        t = time.time()
        handle.verify.remote({"image": image, "source_image": face, "stage_direction": "frowns",
                              "image_placeholder": g.placeholder}).result()
        out["verify"].append(time.time() - t)
    return {k: percentiles(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror-out", default="/tmp/mirror-demo", help="a MIRROR run's output folder")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.mirror_out, "mirror_data.csv")):
        raise SystemExit(f"{args.mirror_out}: no mirror_data.csv (run the MIRROR demo first: "
                         "python -m jobs mirror ...)")
    load0 = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-mllava-")
    result: dict = {"date": date.today().isoformat(), "config": vars(args), "machine": machine()}
    result["training"] = train(args.mirror_out, work, args.train_steps, args.train_batch)

    from ray import serve

    from jobs.mirror_llava.infer import infer, read_clients
    from jobs.mirror_llava.serve import build_app, load_serve_recipe

    recipe = load_serve_recipe("offline", overrides=[
        "app_name=mirror_llava_bench", f"counselor.model.model={json.dumps(result['training']['checkpoint'])}",
        "counselor.params.max_tokens=32"])
    t0 = time.time()
    serve.start(http_options={"location": "NoServer"})
    handle = serve.run(build_app(recipe), name=recipe.app_name, route_prefix=None)
    result["serve_start_s"] = round(time.time() - t0, 1)
    try:
        result["serve_latency"] = latency(handle, args.requests)
        clients = read_clients(os.path.join(args.mirror_out, "mirror_data.csv"), limit=args.sessions)
        cfg = {"cot": "ec_planning", "max_turns": args.max_turns, "context": 16, "temperature": 0.0,
               "max_attempts": 10, "counselor_max_tokens": None}
        t0 = time.time()
        counts = infer(clients, os.path.join(work, "sessions"), recipe.app_name, cfg, concurrency=2)
        wall = time.time() - t0
        walls = counts.pop("session_wall_s")
        result["sessions"] = {**counts, "max_turns": args.max_turns, "cot": "ec_planning", "wall_s": round(wall, 1),
                              "session_s": walls,
                              "sessions_per_hour": round(3600 * counts["finished"] / wall, 1) if counts["finished"]
                              else None}
    finally:
        serve.delete(recipe.app_name)
    result["loadavg_start"], result["loadavg_end"] = load0, os.getloadavg()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"mirror_llava-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("training", "serve_latency", "sessions")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
