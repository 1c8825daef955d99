"""``python -m jobs antidote-dpo-train``: DPO with a LoRA on Antidote's preference pairs, with TRL's
``DPOTrainer`` on Ray Train (SPEC C9; issue 19 item 3).

::

    python -m jobs antidote-dpo-train --data PAIRS_OUT --output CKPT [--profile offline|local|paper]
        [--base MODEL] [--epochs E] [--max-steps N] [--lr LR] [--beta B] [--lora-rank R] [--lora-alpha A]
        [--batch-size B] [--grad-accum G] [--max-length L] [--save-steps N] [--workers W]
        [--gpus-per-worker G] [--cpus-per-worker C] [--address ADDR]

``--data`` is an ``antidote-pairs`` output folder (its ``pairs.parquet``) or ms-swift DPO JSONL
files (comma-separated). The pairs go into a Ray Data dataset; each Ray Train worker runs
``actors.vlm_dpo.train_loop`` (TRL ``DPOTrainer``, LoRA on the language model, the reference
model = the base with the adapter off). Checkpoints go to ``CKPT/train/`` (local or ``s3://``);
rerunning with the same ``--output`` resumes (a larger ``--max-steps``/``--epochs`` trains
further). At the end the last checkpoint's adapter, processor and ``base.json`` are copied to
``CKPT/model/``, a folder the shared LLM stage loads as a model (``antidote-pairs --model
CKPT/model``, or ``{backend: transformers, model: CKPT/model}``). ``CKPT/manifest.json`` holds the
configuration, the base's identity, the data fingerprint, the loss curve, DPO samples/s and the
reload check; ``CKPT/report.html`` plots the curve.

Profiles (``actors.vlm_dpo.PROFILES``): ``paper`` = Antidote's ``train_llava.sh`` (llava-1.5-7b,
bf16, 1 epoch, lr 2e-6, no warm-up, batch 8 x grad-accum 2 per GPU, LoRA r 128 / alpha 256,
beta 0.1, frozen vision tower, max length 1024, seed 0; 4 GPUs as the original: ``--workers 4``,
one GPU each by default); ``offline`` = the tiny random LLaVA placeholder on CPU (labelled as
placeholder in the manifest, the report, ``base.json`` and by the model resolver, so every row a
fine-tuned placeholder answers is marked); ``local`` = llava-interleave-qwen-0.5b.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

from jobs.core import report
from jobs.core.training import lora_training_parser
from udfs import io

RUN_NAME = "train"  # RunConfig name: checkpoints under CKPT/train/
#: GPUs per worker unless --gpus-per-worker: the paper's 7B model trains on GPUs (SPEC C9: 4 GPUs)
GPUS_PER_WORKER = {"offline": 0.0, "local": 0.0, "paper": 1.0}


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m jobs antidote-dpo-train`` (None = the profile's value)."""
    ap = lora_training_parser(
        "python -m jobs antidote-dpo-train", "DPO with a LoRA on Antidote preference pairs (TRL on Ray Train)",
        data_help="antidote-pairs output folder, or ms-swift DPO JSONL files (comma-separated)",
        batch_help="pairs per device per micro-batch", length_help="longest prompt + answer in tokens",
        workers_help="Ray Train workers (DDP; default 4 for paper, else 1)", workers_default=None,
        precision_choices=("fp32", "bf16"))
    ap.add_argument("--beta", type=float, help="DPO beta")
    ap.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    return ap


def train_config(args):
    """``actors.vlm_dpo.DPOTrainConfig`` from the parsed options (profile + overrides)."""
    from actors.vlm_dpo import profile_config

    keys = ("base", "revision", "epochs", "max_steps", "learning_rate", "beta", "lora_rank", "lora_alpha",
            "lora_dropout", "batch_size", "grad_accum", "max_length", "precision", "gradient_checkpointing",
            "save_steps", "seed", "num_threads")
    over = {k: getattr(args, k) for k in keys}
    if args.lora_targets:
        over["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return profile_config(args.profile, **over)


def _throughput(run: list[dict]) -> dict:
    """Pairs per second over this run's steps, the first (start-up) step excluded."""
    steady = [p for p in run[1:] if p.get("step_s")]
    secs = sum(p["step_s"] for p in steady)
    return {"samples_per_s": round(sum(p["samples"] for p in steady) / secs, 3) if secs else None,
            "step_s_median": round(statistics.median(p["step_s"] for p in steady), 4) if steady else None,
            "step_s_first": run[0].get("step_s") if run else None,
            "note": "DPO samples = preference pairs (each a chosen and a rejected sequence); first step excluded"}


def main(argv: list[str]) -> int:
    """``python -m jobs antidote-dpo-train``: fit, export ``CKPT/model``, write the manifest.

    Returns 0 on success. Raises ``ValueError`` for bad options or pairs (naming the pair and
    field), ``FileNotFoundError`` for missing ``--data``, and re-raises a failed Ray Train run."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from actors.models import resolve
    from actors.vlm_dpo import (
        export_model,
        probe_record,
        read_pairs,
        steps_per_epoch,
        train_loop,
    )
    from actors.vlm_lora import check_reload
    from jobs.core.driver import ray_init
    from jobs.core.runtime import forwarded_env

    args = parser().parse_args(argv)
    workers = args.workers or (4 if args.profile == "paper" else 1)
    gpus = GPUS_PER_WORKER[args.profile] if args.gpus_per_worker is None else float(args.gpus_per_worker)
    if workers < 1 or gpus < 0 or args.cpus_per_worker < 0:
        raise ValueError("--workers must be >= 1 and --gpus-per-worker/--cpus-per-worker >= 0")
    cfg = train_config(args)
    resolved = resolve({"backend": "transformers", "model": cfg.base, "revision": cfg.revision})
    pairs = read_pairs(args.data)
    probe = probe_record(pairs[0])
    t0 = time.time()
    ray_init(args.address)
    import ray.data

    fs, path = io.filesystem(args.output)
    storage = {"storage_path": path, "storage_filesystem": fs} if io.is_remote(args.output) else {"storage_path": path}
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg.model_dump(), "probe": probe},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": float(args.cpus_per_worker),
                                                           **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=RunConfig(name=RUN_NAME, **storage, failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": forwarded_env()}),
        datasets={"train": ray.data.from_items(pairs)},
        dataset_config=DataConfig(datasets_to_split=[]))  # every worker sees all pairs; the HF sampler shards
    result = trainer.fit()
    wall = time.time() - t0
    curve, reload, model_dir = [], None, None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            curve = json.loads(io.read_text(f"{d}/loss_curve.json"))
            if cfg.verify_reload:
                reload = check_reload(d, probe)
            model_dir = export_model(d, io.join(args.output, "model"))
    resumed_from = int(result.metrics.get("resumed_from_step") or 0)
    run = [p for p in curve if p["step"] > resumed_from]
    data_text = "\n".join(json.dumps(p, sort_keys=True) for p in pairs)
    manifest = {
        "command": "antidote-dpo-train", "argv": argv, "profile": args.profile, "config": cfg.model_dump(),
        "base_model": resolved.describe(),
        "placeholder_stages": ["dpo_train"] if resolved.placeholder else [], "audit_stages": [],
        "trainer": "trl.DPOTrainer (loss sigmoid) + peft LoRA on Ray Train",
        "data": {"uri": args.data, "pairs": len(pairs),
                 "by_type": {t: sum(1 for p in pairs if p["query_type"] == t) for t in sorted({p["query_type"]
                                                                                               for p in pairs})},
                 "sha256": hashlib.sha256(data_text.encode()).hexdigest()},
        "scaling": {"workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": args.cpus_per_worker,
                    "strategy": "ddp"},
        "steps_per_epoch": steps_per_epoch(len(pairs), cfg, workers),
        "checkpoint": result.checkpoint.path if result.checkpoint else None, "model": model_dir,
        "storage": io.join(args.output, RUN_NAME),
        "global_step": curve[-1]["step"] if curve else None, "total_steps": result.metrics.get("total_steps"),
        "resumed_from_step": resumed_from, "steps_this_run": len(run), "throughput": _throughput(run),
        "loss_curve": curve, "reload_check": reload, "wall_s": round(wall, 2),
    }
    io.write_text(io.join(args.output, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    report.write_quietly(args.output)
    last = curve[-1] if curve else {}
    print(f"step {manifest['global_step']}/{manifest['total_steps']} (resumed from {resumed_from}), "
          f"loss {last.get('loss')}, {manifest['throughput']['samples_per_s']} pairs/s; model in {model_dir}")
    if resolved.placeholder:
        print("NOTE: the base is a placeholder (tiny random weights): the fine-tuned model is a placeholder too.")
    if reload:
        diff = reload.get("max_abs_diff")
        print(f"reload check: {reload.get('skipped') or f'max |logit diff| {diff:.3g}'}")
    return 0

