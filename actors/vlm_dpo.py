"""DPO fine-tuning of a LLaVA-style VLM with TRL's ``DPOTrainer`` and a peft LoRA, on Ray Train
(Antidote's preference alignment, SPEC C9; issue 19 item 3).

The original runs ms-swift's ``swift rlhf`` (DPO) with DeepSpeed ZeRO-2 on 4 GPUs
(``preference_alignment/train_llava.sh``). Here one Ray Train ``TorchTrainer`` runs ``train_loop``
on every worker; inside it TRL's ``DPOTrainer`` (the DPO loss, the vision collator, the
reference model = the base with the adapter disabled) trains a LoRA on the language model. What
is shared with MIRROR-LLaVA's trainer (``actors.vlm_lora``): base loading (placeholders built on
the worker's node), the LoRA target rule (language model only: the vision tower and projector
stay frozen, ms-swift's ``--freeze_vit true``), the checkpoint layout the LLM stage loads
(``base.json`` + the peft adapter + the processor; ``load_finetuned``), and the reload check
(``check_reload``: last-position logits of a probe record, stored at save time, compared with a
fresh reload over the base).

- **Data**: the pairs come from Ray Data (``jobs.antidote_dpo`` reads ``pairs.parquet``); each
  worker gets the whole dataset (``DataConfig(datasets_to_split=[])``) and turns it into a
  ``datasets.Dataset`` (images decoded lazily from their paths); Transformers' ``Trainer``
  shards it across the workers with its seeded distributed sampler, so the order of the
  samples is a function of the seed, and a resumed run skips exactly the batches already done.
- **Checkpoints**: the ``Trainer``'s own (adapter, optimizer, scheduler, RNG states, trainer
  state, processor) every ``save_steps`` and at the end; rank 0 adds ``base.json``,
  ``loss_curve.json`` and ``reload_check.pt`` and every worker reports to Ray Train
  (``make_report_callback``), which keeps ``keep_checkpoints`` of them in ``CKPT/train/``.
- **Resume**: ``ray.train.get_checkpoint()`` (same ``RunConfig(name, storage_path)``) is handed
  to ``Trainer.train(resume_from_checkpoint=...)``; a larger ``max_steps``/``epochs`` continues
  on the new schedule (the restored optimizer's learning rate is reset from it at the start). The checkpoint must come from the same base and LoRA shape.
- **Hyper-parameters** (``PROFILES["paper"]``, SPEC C9 / train_llava.sh): llava-1.5-7b, bf16,
  1 epoch, lr 2e-6, warm-up 0, batch 8 per device x grad-accum 2, LoRA r 128 / alpha 256,
  beta 0.1, rpo_alpha 0 (TRL's plain ``sigmoid`` loss), frozen vision tower, max length 1024,
  seed 0. Not set by the script, so ms-swift 2.x's defaults as we read them in its
  ``SftArguments`` [modelscope/ms-swift swift/llm/utils/argument.py]: LoRA dropout 0.05,
  weight decay 0.1, max grad norm 0.5, linear schedule; LoRA targets ``q_proj, k_proj, v_proj``
  of the language model (our reading of ms-swift's default for llama-family models; the exact
  ms-swift version Antidote used is not stated). Differences we keep: TRL truncates a pair
  longer than ``max_length`` (keep the start) where ms-swift 2.x drops it
  (``truncation_strategy delete``), and ms-swift holds out 1 % of the data for evaluation
  (``dataset_test_ratio 0.01``) where we train on all of it.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Literal

from pydantic import Field

from actors.vlm_lora import LoraBase
from udfs import antidote_pairs as P
from udfs import io
from udfs import rows as R

__all__ = [
    "MODEL_FILES",
    "PROFILES",
    "DPOTrainConfig",
    "dpo_args",
    "export_model",
    "hf_dataset",
    "lora_config",
    "make_report_callback",
    "probe_record",
    "profile_config",
    "read_pairs",
    "steps_per_epoch",
    "train_loop",
]

#: files of a checkpoint that the LLM stage needs to load it (``actors.vlm_lora.load_finetuned``)
MODEL_FILES = ("base.json", "adapter_config.json", "adapter_model.safetensors", "reload_check.pt",
               "loss_curve.json")


class DPOTrainConfig(LoraBase):
    """DPO hyper-parameters; field descriptions are the docs (``paper`` profile = SPEC C9)."""

    lora_targets: list[str] = Field(["q_proj", "k_proj", "v_proj"], min_length=1,
                                    description="Language-model linear layers LoRA wraps, or ['all-linear']; the "
                                    "vision tower and projector are never wrapped (frozen ViT).")
    beta: float = Field(0.1, gt=0, description="DPO beta (Antidote: 0.1).")
    learning_rate: float = Field(gt=0, description="Learning rate (Antidote: 2e-6).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up share of the steps (Antidote: 0).")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Schedule after warm-up (ms-swift 2.x default: linear).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (ms-swift 2.x default 0.1).")
    max_grad_norm: float = Field(0.5, gt=0, description="Gradient clipping (ms-swift 2.x default 0.5).")
    epochs: int = Field(1, ge=1, description="Passes over the pairs (Antidote: 1).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(ge=1, description="Pairs per device per micro-batch (Antidote: 8).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps (Antidote: 2).")
    max_length: int = Field(1024, ge=8, description="Longest prompt + answer in tokens, image tokens included "
                            "(Antidote: 1024).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Weights and compute (Antidote: bf16).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps and at the end.")
    keep_checkpoints: int = Field(1, ge=1, description="Checkpoints Ray Train keeps (save_total_limit 1).")


#: offline: the tiny LLaVA placeholder (outputs meaningless; a larger learning rate than the
#: paper's so two steps visibly move the loss); local: a small real LLaVA-style model;
#: paper: Antidote's recipe (SPEC C9), one GPU per worker, 4 workers as the original
PROFILES: dict[str, dict[str, Any]] = {
    "offline": {"base": "placeholder:tiny-llava", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                "learning_rate": 1e-3, "batch_size": 2, "grad_accum": 1, "max_length": 1024, "save_steps": 50,
                "num_threads": 2},
    "local": {"base": "llava-hf/llava-interleave-qwen-0.5b-hf", "lora_rank": 16, "lora_alpha": 32,
              "learning_rate": 5e-6, "batch_size": 2, "grad_accum": 2, "save_steps": 100},
    "paper": {"base": "llava-hf/llava-1.5-7b-hf", "lora_rank": 128, "lora_alpha": 256, "lora_dropout": 0.05,
              "lora_targets": ["q_proj", "k_proj", "v_proj"], "beta": 0.1, "learning_rate": 2e-6,
              "warmup_ratio": 0.0, "lr_scheduler": "linear", "weight_decay": 0.1, "max_grad_norm": 0.5,
              "epochs": 1, "batch_size": 8, "grad_accum": 2, "max_length": 1024, "precision": "bf16",
              "gradient_checkpointing": True, "save_steps": 500, "keep_checkpoints": 1, "seed": 0,
              "verify_reload": False},
}


def profile_config(profile: str, **overrides: Any) -> DPOTrainConfig:
    """``DPOTrainConfig`` of ``profile`` with the non-None ``overrides``. Raises ``ValueError`` for
    an unknown profile and pydantic's ``ValidationError`` for bad values."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    return DPOTrainConfig.model_validate({**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}})


# ----------------------------------------------------------------------------- data

PAIR_FIELDS = ("id", "query_type", "image", "question", "chosen", "rejected")


def _swift_rows(uri: str) -> list[dict]:
    """Rows of one ms-swift DPO JSONL file; ids are content hashes (the format has none)."""
    out = []
    records, bad = io.read_records(uri)
    if bad:
        raise ValueError(bad[0]["reason"])
    stem = uri.rsplit("/", 1)[-1].removesuffix(".jsonl")
    for n, rec in records:
        rid = f"{stem}:line-{n + 1}"
        trl = P.swift_to_trl(rec, rid)
        out.append({"id": R.content_id(rec["query"], rec["response"], rec["rejected_response"], rec["images"][0]),
                    "query_type": stem, "image": rec["images"][0], "question": trl["prompt"][0]["content"],
                    "chosen": rec["response"], "rejected": rec["rejected_response"]})
    return out


def read_pairs(uri: str) -> list[dict]:
    """Preference pairs ``{id, query_type, image, question, chosen, rejected}`` (str each), sorted
    by id: from an ``antidote-pairs`` output folder (its ``pairs.parquet``), or from ms-swift DPO
    JSONL files (comma-separated; ``query`` with ``<image>``, ``response``, ``rejected_response``,
    ``images``; ids are content hashes).

    Raises ``FileNotFoundError`` when nothing is there, ``ValueError`` when there are no pairs or
    an id repeats, and ``rows.InputError`` naming the row and field for a missing or empty field.
    """
    parts = [u.strip() for u in uri.split(",") if u.strip()]
    if len(parts) == 1 and not parts[0].endswith(".jsonl"):
        path = io.join(parts[0], "pairs.parquet")
        if not io.exists(path):
            raise FileNotFoundError(f"--data {parts[0]}: no pairs.parquet (run antidote-pairs first)")
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(pa.BufferReader(io.read_bytes(path))).to_pylist()
        rows = [{"id": r.get("id"), "query_type": r.get("query_type"), "image": r.get("image"),
                 "question": r.get("question"), "chosen": r.get("chosen"), "rejected": r.get("rejected")} for r in rows]
    else:
        rows = []
        for p in parts:
            if not io.exists(p):
                raise FileNotFoundError(f"--data {p}: no such file")
            rows += _swift_rows(p)
    if not rows:
        raise ValueError(f"--data {uri}: no preference pairs")
    seen = set()
    for k, r in enumerate(rows):
        rid = str(r.get("id") or f"#{k}")
        for f in PAIR_FIELDS:
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise R.InputError(rid, f, "missing or empty")
        if rid in seen:
            raise ValueError(f"--data {uri}: duplicate pair id {rid!r}")
        seen.add(rid)
    return sorted(rows, key=lambda r: r["id"])


def probe_record(pair: dict) -> dict:
    """A pair as a LLaVA record (``actors.vlm_lora.read_records`` row: ``question_id``, ``image``,
    ``conversations`` JSON; the chosen answer as the reply) for the reload check's probe."""
    convs = [{"from": "human", "value": f"{P.IMAGE_TAG}\n{pair['question']}"}, {"from": "gpt", "value": pair["chosen"]}]
    return {"question_id": pair["id"], "image": pair["image"], "conversations": json.dumps(convs, ensure_ascii=False)}


def hf_dataset(pairs: list[dict]):
    """The pairs as a ``datasets.Dataset`` in TRL's vision preference form: ``prompt`` /
    ``chosen`` / ``rejected`` (conversational, ``udfs.antidote_pairs.trl_record``) and
    ``images`` (``datasets.Image``, decoded from the paths when a row is read)."""
    from datasets import Dataset, Features, Image, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    features = Features({"prompt": msg, "chosen": msg, "rejected": msg, "images": List(Image())})
    recs = [P.trl_record(p["question"], p["chosen"], p["rejected"], p["image"]) for p in pairs]
    return Dataset.from_list(recs, features=features)


# ----------------------------------------------------------------------------- model and trainer

def lora_config(model, cfg: DPOTrainConfig):
    """peft ``LoraConfig`` on the language model's ``cfg.lora_targets`` only (``actors.vlm_lora``'s
    rule: the vision tower's layers have the same names), no ``modules_to_save`` (projector
    frozen). Raises ``ValueError`` for a target that is no linear layer of the language model."""
    from peft import LoraConfig

    from actors.vlm_lora import lora_target_modules, lora_target_regex

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=lora_target_regex(lora_target_modules(model, cfg.lora_targets)))


def dpo_args(cfg: DPOTrainConfig, output_dir: str, use_cpu: bool):
    """TRL ``DPOConfig`` for ``cfg``: checkpoints every ``save_steps`` (and at the end) into
    ``output_dir``, a log point every step, no external reporting, ``sigmoid`` loss (DPO)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        lr_scheduler_type=cfg.lr_scheduler, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta, loss_type=["sigmoid"], max_length=cfg.max_length, bf16=cfg.precision == "bf16",
        gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=1, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=use_cpu, remove_unused_columns=True)


def _spec(cfg: DPOTrainConfig) -> dict:
    return {"backend": "transformers", "model": cfg.base, "revision": cfg.revision}


def make_report_callback(cfg: DPOTrainConfig, resolved, probe: dict, processor, curve: list, world: int,
                         rank: int, device, dtype, resumed_from: int = 0):
    """A ``transformers.TrainerCallback`` that keeps the loss curve in ``curve`` (pre-filled with
    a resumed run's points) and, at every checkpoint, completes the ``Trainer``'s folder into our
    layout and reports it to Ray Train.

    Curve points: ``step``, ``epoch``, ``loss`` (the DPO loss of the step, nats), ``lr``,
    ``rewards_margin``, ``rewards_accuracy`` (TRL's logged metrics), ``step_s`` (seconds since
    the previous step's end), ``samples`` (pairs per optimizer step over all workers). At a save,
    rank 0 writes ``base.json`` (the base's spec and resolved identity, the config, the global
    step), ``loss_curve.json`` and ``reload_check.pt`` (the probe's last-position logits in eval
    mode, ``actors.vlm_lora.probe_logits``) into the checkpoint folder; every rank then calls
    ``ray.train.report`` (rank 0 with the folder). ``saved`` tells whether it reported."""
    import ray.train
    import torch
    from transformers import TrainerCallback

    from actors.vlm_lora import Collator, probe_logits

    probe_batch = Collator(processor, cfg.max_length, "never")([probe])
    per_step = cfg.batch_size * cfg.grad_accum * world

    class _Callback(TrainerCallback):
        def __init__(self):
            self.t_last = None
            self.step_s: dict[int, float] = {}
            self.saved = False

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            self.t_last = time.perf_counter()
            if state.global_step and optimizer is not None and hasattr(lr_scheduler, "lr_lambdas"):
                # a resumed run's optimizer holds the lr the old schedule set after its last step;
                # a larger max_steps continues on the new schedule (same schedule: the same value)
                for g, base, fn in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
                    g["lr"] = base * fn(state.global_step)
                lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.step_s[state.global_step] = round(now - self.t_last, 4)
            self.t_last = now

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or any(p["step"] == state.global_step for p in curve):
                return
            curve.append({"step": state.global_step, "epoch": round(float(state.epoch or 0), 4),
                          "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
                          "rewards_margin": logs.get("rewards/margins"),
                          "rewards_accuracy": logs.get("rewards/accuracies"),
                          "step_s": self.step_s.get(state.global_step), "samples": per_step})

        def on_save(self, args, state, control, model=None, **kw):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            metrics = {"step": state.global_step, "total_steps": state.max_steps, "resumed_from_step": resumed_from,
                       "loss": curve[-1]["loss"] if curve else None}
            if rank == 0:
                with open(os.path.join(folder, "base.json"), "w") as f:
                    json.dump({"spec": _spec(cfg), "resolved": resolved.describe(), "config": cfg.model_dump(),
                               "global_step": state.global_step, "trainer": "antidote-dpo-train"}, f, indent=2)
                with open(os.path.join(folder, "loss_curve.json"), "w") as f:
                    json.dump(curve, f)
                torch.save({"question_id": probe["question_id"], "dtype": str(dtype).removeprefix("torch."),
                            "logits": probe_logits(model, probe_batch, device, dtype)},
                           os.path.join(folder, "reload_check.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
            self.saved = True

    return _Callback()


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _check_compatible(ckpt_dir: str, cfg: DPOTrainConfig) -> None:
    meta = _read_json(os.path.join(ckpt_dir, "base.json"))
    old = meta.get("config", {})
    for key in ("base", "revision", "lora_rank", "lora_alpha", "lora_targets"):
        if old.get(key) != getattr(cfg, key):
            raise ValueError(f"the output's checkpoint was trained with {key}={old.get(key)!r}, this run asks for "
                             f"{getattr(cfg, key)!r}: use another --output to start a new run")


def train_loop(config: dict) -> None:
    """Ray Train per-worker loop (``TorchTrainer(train_loop, train_loop_config=...)``).

    ``config``: ``cfg`` (``DPOTrainConfig`` dict), ``probe`` (a ``probe_record``). Reads the whole
    ``train`` dataset (rows of ``read_pairs``), loads the base, runs ``DPOTrainer`` with the
    LoRA of ``lora_config``, resuming from ``ray.train.get_checkpoint()`` when there is one, and
    reports every checkpoint (``make_report_callback``). Raises ``ValueError`` when the dataset
    is empty or the checkpoint belongs to another base/LoRA shape.
    """
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    from trl import DPOTrainer

    from actors.vlm_lora import load_base

    cfg = DPOTrainConfig.model_validate(config["cfg"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    pairs = list(ray.train.get_dataset_shard("train").iter_rows())
    if not pairs:
        raise ValueError(f"worker {rank}: the train dataset is empty")
    pairs = sorted(pairs, key=lambda r: r["id"])  # the sampler's seed alone decides the order
    model, processor, resolved = load_base(_spec(cfg), device, dtype)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    peft_cfg = lora_config(model, cfg)

    resume, curve, resumed_from = None, [], 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume = ckpt.to_directory(tempfile.mkdtemp(prefix="antidote-dpo-resume-"))
        _check_compatible(resume, cfg)
        curve = _read_json(os.path.join(resume, "loss_curve.json"))
        resumed_from = _read_json(os.path.join(resume, "trainer_state.json"))["global_step"]
    out_dir = tempfile.mkdtemp(prefix="antidote-dpo-")
    callback = make_report_callback(cfg, resolved, config["probe"], processor, curve, world, rank, device, dtype,
                                    resumed_from)
    trainer = DPOTrainer(model=model, args=dpo_args(cfg, out_dir, use_cpu=device.type == "cpu"),
                         train_dataset=hf_dataset(pairs), processing_class=processor, peft_config=peft_cfg,
                         callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    if not callback.saved:  # resumed with nothing left to do: report the restored checkpoint again
        ray.train.report({"step": resumed_from, "total_steps": trainer.state.max_steps,
                          "resumed_from_step": resumed_from, "loss": curve[-1]["loss"] if curve else None},
                         checkpoint=ray.train.Checkpoint.from_directory(resume) if rank == 0 else None)


def steps_per_epoch(n_pairs: int, cfg: DPOTrainConfig, workers: int) -> int:
    """Optimizer steps of one epoch: ``ceil(pairs / (workers x batch))`` micro-batches per
    worker, grouped by ``grad_accum`` (the last partial group still steps)."""
    micro = math.ceil(n_pairs / (workers * cfg.batch_size))
    return max(1, math.ceil(micro / cfg.grad_accum))


def export_model(ckpt_dir: str, target: str) -> str:
    """Copy what loading needs (``MODEL_FILES`` and the processor's files) from a checkpoint
    folder to ``target`` (local or ``s3://``), so ``--model target`` works in the LLM stage;
    returns ``target``. Optimizer and RNG states stay in the Ray Train checkpoint."""
    skip = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json", "README.md"}
    io.delete(target)
    for name in sorted(os.listdir(ckpt_dir)):
        src = os.path.join(ckpt_dir, name)
        if name in skip or not os.path.isfile(src) or name.startswith("rng_state"):
            continue
        with open(src, "rb") as f:
            io.write_bytes(io.join(target, name), f.read())
    return target
