"""Command-line options every LoRA training command shares (``mirror-llava-train``,
``antidote-dpo-train``): data and checkpoint folders, the hyper-parameter profile and its
overrides, and the Ray Train scaling. ``None`` means "the profile's value"."""
from __future__ import annotations

import argparse


def lora_training_parser(prog: str, description: str, data_help: str, batch_help: str, length_help: str,
                         workers_help: str, workers_default: int | None,
                         precision_choices: tuple[str, ...] = ("auto", "fp32", "bf16")) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared options; the command adds its own."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--data", required=True, help=data_help)
    ap.add_argument("--output", required=True, help="checkpoint folder or s3:// URI; an existing run there resumes")
    ap.add_argument("--profile", choices=["offline", "local", "paper"], default="offline",
                    help="hyper-parameter profile (default offline: placeholder tiny LLaVA)")
    ap.add_argument("--base", help="base VLM (hub id, folder or placeholder:NAME); default: the profile's")
    ap.add_argument("--revision", help="hub revision of --base")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    ap.add_argument("--lr", type=float, dest="learning_rate", help="learning rate of the LoRA weights")
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--lora-alpha", type=int)
    ap.add_argument("--lora-dropout", type=float)
    ap.add_argument("--lora-targets", help="comma-separated language-model modules, or all-linear for every "
                    "linear layer of the language model (default: the profile's)")
    ap.add_argument("--batch-size", type=int, help=batch_help)
    ap.add_argument("--max-length", type=int, help=length_help)
    ap.add_argument("--precision", choices=list(precision_choices))
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--save-steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, dest="num_threads", help="torch threads per worker")
    ap.add_argument("--workers", type=int, default=workers_default, help=workers_help)
    ap.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default: the profile's)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    return ap
