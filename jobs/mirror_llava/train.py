"""``python -m jobs mirror-llava-train``: LoRA fine-tuning of a LLaVA-style VLM on
MIRROR-LLaVA records with Ray Train (SPEC B2; issue 10 part 2).

::

    python -m jobs mirror-llava-train --data OUT/train.json --output CKPT [--profile offline|local|paper]
        [--base MODEL] [--epochs E] [--lr LR] [--projector-lr LR] [--lora-rank R] [--lora-alpha A]
        [--batch-size B] [--max-length L] [--max-steps N] [--save-steps N] [--workers W]
        [--gpus-per-worker G] [--cpus-per-worker C] [--address ADDR]

Fine-tunes the profile's base VLM with LoRA (``actors.vlm_lora``) as a Ray Train
``TorchTrainer`` over a Ray Data dataset of the records. Checkpoints go to
``CKPT/train/checkpoint_*`` (``CKPT`` local or ``s3://``); rerunning with the same ``--output``
resumes from the last checkpoint (a larger ``--max-steps`` or ``--epochs`` continues training).
``CKPT/manifest.json`` holds the configuration, base model identity, data fingerprint, the
loss curve, throughput (samples/s, step time) and the reload check. Also submittable:
``python -m jobs submit mirror-llava-train ...``.

Resources: ``--profile paper`` asks for one GPU per worker (``GPUS_PER_WORKER``); offline and
local default to CPU workers; ``--gpus-per-worker`` overrides either way.

Distribution, against the original (SPEC B2: ``deepspeed`` with ZeRO-3, ``scripts/zero3.json``):
each worker here is a DDP replica (``ray.train.torch.prepare_model``): it holds the whole
frozen base and the trainable LoRA + projector weights, and only the trainable gradients are
all-reduced. ZeRO-3 shards parameters, gradients and optimizer state over the GPUs. For LoRA
the part ZeRO-3 saves is small: the frozen base in bf16 is about 14 GB for LLaVA-1.5-7B
(about 26 GB for 13B), and the trainable state (all-linear LoRA r 128 about 0.32 B parameters
for 7B, 0.50 B for 13B, plus the 21 M-parameter projector; fp32 weights, gradients and two
Adam moments, 16 bytes each) about 5.4 GB (8.4 GB). Per worker that is about 20 GB (35 GB)
before activations; activations at MIRROR's 32 records x 2048 tokens with gradient
checkpointing add an estimated 35-50 GB (checkpointed layer inputs about 17 GB for 7B, logits
and their gradient in fp32 the rest). These are estimates from the shapes, not measurements
(no GPU here): they put the 7B run on one 80 GB GPU per worker, and not on 40/48 GB cards at
32 per device; there, lower ``--batch-size`` (the global batch is batch x workers). Sharding
(FSDP through ``prepare_model(parallel_strategy="fsdp")``, or DeepSpeed) is not offered: the
7B and 13B LoRA runs do not need it by this estimate, and Ray Train's FSDP path needs CUDA
and at least two workers, which no test here can run.
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


def parser() -> argparse.ArgumentParser:
    """Options of ``python -m jobs mirror-llava-train`` (None = the profile's value)."""
    ap = lora_training_parser(
        "python -m jobs mirror-llava-train", "LoRA fine-tuning of a LLaVA-style VLM on MIRROR-LLaVA records (Ray Train)",
        data_help="train.json of mirror-llava-data (local or s3://)", batch_help="per-device batch size",
        length_help="model_max_length in tokens", workers_help="Ray Train workers (data-parallel, DDP)",
        workers_default=1)
    ap.add_argument("--projector-lr", type=float, help="multimodal projector learning rate")
    ap.add_argument("--warmup-ratio", type=float)
    return ap


#: GPUs per Ray Train worker when ``--gpus-per-worker`` is not given: the paper profile trains
#: LLaVA-1.5-7B on GPUs (SPEC B2: DeepSpeed on GPUs); the offline placeholder and the local
#: profile's small model run on a CPU box
GPUS_PER_WORKER = {"offline": 0.0, "local": 0.0, "paper": 1.0}


def scaling(args):
    """Ray Train ``ScalingConfig`` from the options: ``--workers`` DDP workers, each with
    ``--cpus-per-worker`` CPUs and ``--gpus-per-worker`` GPUs (default ``GPUS_PER_WORKER`` of
    the profile); ``use_gpu`` when a worker has a GPU share. Raises ``ValueError`` for fewer
    than 1 worker or negative resources."""
    from ray.train import ScalingConfig

    gpus = GPUS_PER_WORKER[args.profile] if args.gpus_per_worker is None else float(args.gpus_per_worker)
    if args.workers < 1 or gpus < 0 or args.cpus_per_worker < 0:
        raise ValueError("--workers must be >= 1 and --gpus-per-worker/--cpus-per-worker >= 0")
    resources = {"CPU": float(args.cpus_per_worker), **({"GPU": gpus} if gpus > 0 else {})}
    return ScalingConfig(num_workers=args.workers, use_gpu=gpus > 0, resources_per_worker=resources)


def train_config(args):
    """``actors.vlm_lora.TrainConfig`` from the parsed options (profile + overrides)."""
    from actors.vlm_lora import profile_config

    keys = ("base", "revision", "epochs", "max_steps", "learning_rate", "projector_lr", "warmup_ratio",
            "lora_rank", "lora_alpha", "lora_dropout", "batch_size", "max_length", "precision",
            "gradient_checkpointing", "save_steps", "seed", "num_threads")
    over = {k: getattr(args, k) for k in keys}
    if args.lora_targets:
        over["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return profile_config(args.profile, **over)


def _loss_curve(result) -> list[dict]:
    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as d:
        with open(f"{d}/loss_curve.json") as f:
            return json.load(f)


def main(argv: list[str]) -> int:
    """``python -m jobs mirror-llava-train``: fit, then write ``CKPT/manifest.json``.

    Returns 0 on success. Raises ``ValueError`` for bad options or records (naming the record),
    ``FileNotFoundError`` for a missing ``--data``, and re-raises a failed Ray Train run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.models import resolve
    from actors.vlm_lora import check_reload, read_records, train_loop
    from jobs.core.driver import ray_init
    from jobs.core.runtime import forwarded_env

    args = parser().parse_args(argv)
    scaling_config = scaling(args)
    cfg = train_config(args)
    resolved = resolve({"backend": "transformers", "model": cfg.base, "revision": cfg.revision})
    records = read_records(args.data)
    if len(records) < args.workers:
        raise ValueError(f"{args.data}: {len(records)} records for {args.workers} workers")
    t0 = time.time()
    ray_init(args.address)
    import ray.data

    ds = ray.data.from_items(records)
    fs, path = io.filesystem(args.output)
    storage = {"storage_path": path, "storage_filesystem": fs} if io.is_remote(args.output) \
        else {"storage_path": path}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "rows_per_worker": len(records) // args.workers,
                           "probe": records[0]},
        scaling_config=scaling_config,
        run_config=RunConfig(name=RUN_NAME, **storage, failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": forwarded_env()}),
        datasets={"train": ds})
    result = trainer.fit()
    wall = time.time() - t0
    curve = _loss_curve(result)
    run = [p for p in curve if p["step"] > result.metrics.get("resumed_from_step", 0)]
    steady = [p["step_s"] for p in run[1:]] or [p["step_s"] for p in run]
    reload = None
    if cfg.verify_reload and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            reload = check_reload(d, records[0])
    data_text = io.read_text(args.data)
    manifest = {
        "command": "mirror-llava-train", "argv": argv, "profile": args.profile, "config": cfg.model_dump(),
        "base_model": resolved.describe(),
        "data": {"uri": args.data, "records": len(records),
                 "sha256": hashlib.sha256(data_text.encode()).hexdigest()},
        "scaling": {"workers": args.workers, "gpus_per_worker": scaling_config.resources_per_worker.get("GPU", 0.0),
                    "cpus_per_worker": args.cpus_per_worker, "strategy": "ddp"},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "storage": io.join(args.output, RUN_NAME),
        "global_step": result.metrics.get("step"), "total_steps": result.metrics.get("total_steps"),
        "resumed_from_step": result.metrics.get("resumed_from_step", 0),
        "steps_this_run": len(run),
        "throughput": {"samples_per_s": round(sum(p["samples"] for p in run[1:]) / sum(steady), 3)
                       if run[1:] and sum(steady) else None,
                       "step_s_median": round(statistics.median(steady), 4) if steady else None,
                       "step_s_first": run[0]["step_s"] if run else None,
                       "note": "steady state: first step of this run excluded"},
        "loss_curve": curve, "reload_check": reload, "wall_s": round(wall, 2),
    }
    io.write_text(io.join(args.output, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    report.write_quietly(args.output)
    last = curve[-1] if curve else {}
    print(f"step {manifest['global_step']}/{manifest['total_steps']} (resumed from "
          f"{manifest['resumed_from_step']}), loss {last.get('loss')}, "
          f"{manifest['throughput']['samples_per_s']} samples/s, median step "
          f"{manifest['throughput']['step_s_median']} s; checkpoint {manifest['checkpoint']}")
    if reload:
        print(f"reload check: {reload.get('skipped') or 'max |logit diff| %.3g' % reload['max_abs_diff']}")
    return 0

