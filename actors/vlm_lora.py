"""LoRA fine-tuning of a LLaVA-style VLM on Ray Train (MIRROR-LLaVA, SPEC B2).

The original runs ``deepspeed llava/train/train_mem.py`` (ZeRO-3) with LoRA; here one
``TorchTrainer`` runs ``train_loop`` on every worker over a Ray Data dataset of LLaVA-1.5
records (``question_id``, ``image``, ``conversations`` as JSON). Measured recipe:
``../shared/notes/faces-train-serve.md`` §1; prompt masking as in ``actors.vlm``.

- **Labels**: each sample is the chat template over prompt + answer (trailing whitespace
  removed) ending with the EOS token, which is supervised: ChatML templates end the turn with
  it, and for templates that write none (llava-1.5-7b-hf's ``ASSISTANT: {text}``) the collator
  appends it (``append_eos``; upstream LLaVA's vicuna_v1 format supervises ``</s>``, and a
  model never trained on it does not stop); the prompt length comes from the
  **processor** run on the prompt with its image (image tokens counted as expanded), so
  ``labels[:n_prompt] = -100``; right padding, padding masked **by length** (pad == eos for
  SmolLM2-based models: masking by id would drop the answer's closing token). Samples longer
  than ``max_length`` lose their tail (as LLaVA's tokenizer truncation); a prompt whose image
  tokens alone exceed it raises.
- **LoRA** (peft): a regex target on the language model's modules only
  (``.*language_model.*\\.(q_proj|v_proj)$`` by default; the CLIP tower has projections of the
  same names); ``lora_targets=["all-linear"]`` (the paper profile) wraps every linear layer of
  the language model, as upstream LLaVA's LoRA (``find_all_linear_names``: everything but the
  vision tower, the projector and ``lm_head``); ``modules_to_save=["multi_modal_projector"]``
  (the projector is trained, at ``projector_lr``, as LLaVA's ``mm_projector_lr``).
- **Schedule**: AdamW, linear warmup over ``ceil(warmup_ratio * total)`` steps then cosine to
  0 (HF ``get_cosine_schedule_with_warmup``), set per step from the global step, so a resumed
  run with a larger ``max_steps`` continues on the new schedule.
- **Checkpoints** (rank 0, every ``save_steps`` and at the end): the peft adapter (LoRA +
  projector), the processor, ``base.json`` (the base model's spec and resolved identity,
  never only a local path), ``train_state.pt`` (optimizer, global step, epoch, batches done in
  the epoch), ``loss_curve.json`` and ``reload_check.pt`` (last-position logits of a fixed
  probe record in eval mode: ``check_reload`` compares a fresh reload against them).
- **Resume**: ``ray.train.get_checkpoint()`` (Ray Train restores the run of the same
  ``RunConfig(name, storage_path)``) → adapter weights, optimizer state and position; the
  batches already done in the current epoch are skipped before collation. With several
  workers the order of Ray Data's streaming split is not guaranteed, so a mid-epoch resume
  continues the step count and schedule exactly but may revisit or skip some records.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.vlm import ImageCache, encode, image_token, record_messages
from udfs import io
from udfs import rows as R

__all__ = ["TrainConfig", "PROFILES", "profile_config", "read_records", "APPEND_EOS", "Collator", "lr_factor",
           "ALL_LINEAR", "lora_target_modules", "lora_target_regex", "apply_lora", "train_loop", "load_finetuned",
           "check_reload", "CHECKPOINT_FILES", "load_base", "probe_logits"]

#: ``lora_targets`` value for every linear layer of the language model
ALL_LINEAR = "all-linear"
#: files every checkpoint folder holds besides the processor's and peft's own
CHECKPOINT_FILES = ("base.json", "train_state.pt", "loss_curve.json", "reload_check.pt")


class LoraBase(BaseModel):
    """What every LoRA fine-tuning of a LLaVA-style model here sets: the base model and the
    adapter. ``TrainConfig`` (MIRROR-LLaVA's supervised training) and
    ``actors.vlm_dpo.DPOTrainConfig`` (Antidote's DPO) add their own hyper-parameters."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base VLM: hub id, local folder or 'placeholder:tiny-llava'.")
    revision: str | None = Field(None, description="Hub revision of the base model.")
    lora_rank: int = Field(ge=1, description="LoRA r (MIRROR-LLaVA and Antidote: 128).")
    lora_alpha: int = Field(ge=1, description="LoRA alpha (MIRROR-LLaVA and Antidote: 256).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (LLaVA's train.py and ms-swift 2.x "
                                "default 0.05).")
    lora_targets: list[str] = Field(["q_proj", "v_proj"], min_length=1,
                                    description="Language-model module names LoRA wraps, or ['all-linear'] for "
                                    "every linear layer of the language model (upstream LLaVA's LoRA; the paper "
                                    "profile). The vision tower and projector are never wrapped.")

    seed: int = Field(0, description="Seed of LoRA init and data order (MIRROR-LLaVA and Antidote: 0).")
    num_threads: int | None = Field(None, ge=1, description="torch threads per worker (Ray sets 1).")
    verify_reload: bool = Field(True, description="After training, reload the checkpoint over the base on the "
                                "driver and compare the logits with the worker's (fp32 runs).")

    @field_validator("lora_targets")
    @classmethod
    def _all_linear_alone(cls, v: list[str]) -> list[str]:
        if ALL_LINEAR in v and len(v) > 1:
            raise ValueError(f"'{ALL_LINEAR}' stands alone in lora_targets, got {v}")
        return v


class TrainConfig(LoraBase):
    """Fine-tuning hyper-parameters (SPEC B2's table; ``paper`` profile = MIRROR's values)."""

    append_eos: Literal["auto", "always", "never"] = Field(
        "auto", description="End every supervised reply with the EOS token: auto appends it when the chat "
        "template writes none after the answer (llava-1.5), as upstream vicuna_v1 training supervises </s>; "
        "never keeps the template's text.")
    learning_rate: float = Field(2e-4, gt=0, description="LoRA learning rate (MIRROR: 2e-4).")
    projector_lr: float = Field(2e-5, gt=0, description="Multimodal projector learning rate (mm_projector_lr 2e-5).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up share of the total steps (0.03).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0).")
    epochs: int = Field(1, ge=1, description="Passes over the data (MIRROR README: 5).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(ge=1, description="Per-device batch size (MIRROR: 32, grad accumulation 1).")
    max_length: int = Field(ge=8, description="model_max_length in tokens, image tokens included (2048).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it (MIRROR: bf16 + tf32), fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (MIRROR: on).")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps and at the end (MIRROR: 500).")
    keep_checkpoints: int = Field(1, ge=1, description="Checkpoints kept (save_total_limit 1).")
    shuffle: bool = Field(True, description="Shuffle records per epoch (seeded, per worker buffer).")

#: profile -> defaults. offline: the placeholder tiny LLaVA (meaningless outputs, for tests and
#: smoke runs); local: a small real LLaVA-style model from the hub; paper: MIRROR's 7B recipe.
PROFILES: dict[str, dict[str, Any]] = {
    "offline": {"base": "placeholder:tiny-llava", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                "batch_size": 2, "max_length": 1024, "epochs": 1, "precision": "fp32", "save_steps": 50,
                "num_threads": 2},
    "local": {"base": "llava-hf/llava-interleave-qwen-0.5b-hf", "lora_rank": 16, "lora_alpha": 32,
              "batch_size": 4, "max_length": 2048, "epochs": 1, "save_steps": 100},
    "paper": {"base": "llava-hf/llava-1.5-7b-hf", "lora_rank": 128, "lora_alpha": 256, "lora_dropout": 0.05,
              "lora_targets": [ALL_LINEAR],
              "learning_rate": 2e-4, "projector_lr": 2e-5, "warmup_ratio": 0.03, "weight_decay": 0.0,
              "batch_size": 32, "max_length": 2048, "epochs": 5, "precision": "bf16",
              "gradient_checkpointing": True, "save_steps": 500, "keep_checkpoints": 1, "verify_reload": False},
}


def profile_config(profile: str, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` of ``profile`` with the non-None ``overrides`` applied. Raises
    ``ValueError`` for an unknown profile and pydantic's ``ValidationError`` for bad values."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    return TrainConfig.model_validate({**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}})


def read_records(uri: str) -> list[dict[str, Any]]:
    """LLaVA records of a ``train.json`` (JSON list; a ``.jsonl`` file also works) as dataset
    rows ``{question_id, image, conversations}`` (conversations as a JSON string; relative image
    paths made absolute against the file's folder).

    Raises ``FileNotFoundError`` for a missing file and ``rows.InputError`` naming the record and
    field for a record without ``question_id``, ``image`` or a human→gpt ``conversations`` list.
    """
    text = io.read_text(uri)
    try:
        data = ([json.loads(line) for line in text.splitlines() if line.strip()]
                if uri.endswith(".jsonl") else json.loads(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected a JSON list of LLaVA records")
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out, seen = [], set()
    for k, rec in enumerate(data):
        qid = str(rec.get("question_id") or rec.get("id") or "") if isinstance(rec, dict) else ""
        rid = qid or f"#{k}"
        if not qid:
            raise R.InputError(rid, "question_id", "missing")
        if qid in seen:
            raise R.InputError(rid, "question_id", "duplicate")
        seen.add(qid)
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise R.InputError(rid, "image", "missing (MIRROR-LLaVA records all have an image)")
        if "://" not in image and not os.path.isabs(image):
            image = io.join(folder, image) if io.is_remote(folder) else os.path.join(
                io.filesystem(folder)[1], image)
        convs = rec.get("conversations")
        try:
            record_messages(convs if isinstance(convs, list) else [], True)
        except (ValueError, AttributeError) as e:
            raise R.InputError(rid, "conversations", str(e)) from None
        out.append({"question_id": qid, "image": image, "conversations": json.dumps(convs, ensure_ascii=False)})
    return out


#: ``Collator``/``TrainConfig.append_eos`` choices
APPEND_EOS = ("auto", "always", "never")


class Collator:
    """Rows of ``read_records`` (a Ray Data numpy batch or a list of dicts) -> model inputs.

    The supervised span is the answer and, after it, the end-of-sequence token: a model that
    never sees EOS as a target does not learn to stop (upstream LLaVA's vicuna_v1 conversations
    end every reply with ``</s>``, which is supervised). Templates that close the turn with the
    tokenizer's EOS (ChatML with ``<|im_end|>`` as EOS) already contain it; for those that do
    not (llava-1.5-7b-hf's ``ASSISTANT: {text}``), ``append_eos="auto"`` (default) appends it;
    ``"always"`` appends it in any case, ``"never"`` leaves the template's text as it is.
    Trailing whitespace after the answer (llava-1.5's template writes a space) is removed.

    Returns a dict of tensors: ``input_ids``/``attention_mask``/``labels`` (long, ``(B, L)``,
    right-padded, ``L <= max_length``), ``pixel_values`` (float, ``(n_images, 3, H, W)``) and any
    other image tensor the processor returns (concatenated along dim 0), plus ``answer_tokens``
    (int: labelled tokens in the batch) and ``truncated`` (int: samples cut at ``max_length``).
    Raises ``rows.InputError`` naming the record for an unreadable image, a prompt that is not
    a prefix of the full conversation, or image tokens that do not fit into ``max_length``;
    ``ValueError`` for an unknown ``append_eos`` or one that needs an EOS the tokenizer lacks.
    """

    def __init__(self, processor, max_length: int, append_eos: str = "auto"):
        if append_eos not in APPEND_EOS:
            raise ValueError(f"append_eos must be one of {', '.join(APPEND_EOS)}, got {append_eos!r}")
        self.processor, self.max_length, self.append_eos = processor, max_length, append_eos
        self.images = ImageCache(size=64)
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_id = tok.convert_tokens_to_ids(image_token(processor))
        self.eos = tok.eos_token if append_eos != "never" else None
        if append_eos != "never" and not self.eos:
            raise ValueError("append_eos needs a tokenizer with an eos_token (use append_eos='never')")

    def _ends_turn(self, full: str) -> str:
        """``full`` (the rendered prompt + answer, trailing whitespace removed) with the EOS token
        appended when ``append_eos`` asks for it: ``always``, or ``auto`` and the template wrote
        no EOS after the answer (llava-1.5's ``ASSISTANT: {text}``; ChatML templates whose
        end-of-turn token is the EOS are left alone)."""
        if self.eos and (self.append_eos == "always" or not full.endswith(self.eos)):
            return full + self.eos
        return full

    def sample(self, qid: str, image: Any, conversations: Any) -> tuple[dict, int]:
        """One record -> (processor outputs of the full text, prompt length in tokens)."""
        import torch

        convs = json.loads(conversations) if isinstance(conversations, str) else list(conversations)
        try:
            prompt_msgs, answer = record_messages(convs, True)
        except ValueError as e:
            raise R.InputError(qid, "conversations", str(e)) from None
        img = self.images.get(image, qid, "image")
        p = self.processor
        full = self._ends_turn(p.apply_chat_template([*prompt_msgs, answer], tokenize=False).rstrip())
        prompt = p.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        enc = encode(p, [full], [[img]], [qid])
        penc_ids = encode(p, [prompt], [[img]], [qid])["input_ids"][0]
        n_prompt = int(penc_ids.shape[0])
        if n_prompt >= enc["input_ids"].shape[1] or not torch.equal(enc["input_ids"][0, :n_prompt], penc_ids):
            raise R.InputError(qid, "conversations", "the chat template's prompt is not a prefix of the full text")
        return enc, n_prompt

    def __call__(self, batch) -> dict[str, Any]:
        import torch

        rows_ = batch if isinstance(batch, list) else [
            {k: batch[k][i] for k in ("question_id", "image", "conversations")}
            for i in range(len(batch["question_id"]))]
        encs, ids, labels = [], [], []
        truncated = 0
        for r in rows_:
            qid = str(r["question_id"])
            enc, n_prompt = self.sample(qid, r["image"], r["conversations"])
            seq = enc["input_ids"][0]
            n_img = int((seq == self.image_id).sum())
            last_img = int((seq == self.image_id).nonzero().max()) + 1 if n_img else 0
            if last_img > self.max_length:
                raise R.InputError(qid, "image", f"{n_img} image tokens end at position {last_img}, "
                                   f"beyond max_length {self.max_length}")
            if seq.shape[0] > self.max_length:
                truncated += 1
                seq = seq[:self.max_length]
            lab = seq.clone()
            lab[:n_prompt] = -100
            encs.append(enc)
            ids.append(seq)
            labels.append(lab)
        L = max(s.shape[0] for s in ids)
        B = len(ids)
        out = {"input_ids": torch.full((B, L), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((B, L), dtype=torch.long),
               "labels": torch.full((B, L), -100, dtype=torch.long)}
        for i, (s, lab) in enumerate(zip(ids, labels)):  # right padding, masked by length
            out["input_ids"][i, :s.shape[0]] = s
            out["attention_mask"][i, :s.shape[0]] = 1
            out["labels"][i, :s.shape[0]] = lab
        for key in encs[0]:
            if key not in ("input_ids", "attention_mask") and hasattr(encs[0][key], "shape"):
                out[key] = torch.cat([e[key] for e in encs], dim=0)
        out["answer_tokens"] = int((out["labels"] != -100).sum())
        out["truncated"] = truncated
        return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup`` steps, then half a cosine down to 0 at ``total`` (the formula of HF
    ``get_cosine_schedule_with_warmup``)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def lora_target_regex(targets: list[str]) -> str:
    """peft ``target_modules`` regex for the language model's ``targets`` only (the vision
    tower's attention layers have the same names)."""
    return r".*language_model.*\.(" + "|".join(targets) + r")$"


def lora_target_modules(model, targets: list[str]) -> list[str]:
    """The module names (last name component) LoRA wraps in ``model``'s language model.

    ``targets``: ``["all-linear"]`` for every ``nn.Linear`` of the language model (LLaVA's
    ``find_all_linear_names``: the vision tower, the projector and ``lm_head`` excluded;
    q/k/v/o and gate/up/down for Llama/Vicuna), sorted; or explicit names, kept in the given
    order. Raises ``ValueError`` naming a target that is no linear layer of the language model.
    """
    import torch.nn as nn

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and ".language_model." in f".{n}." and not n.endswith("lm_head")}
    if list(targets) == [ALL_LINEAR]:
        if not linear:
            raise ValueError("the model has no linear layer under a 'language_model' module")
        return sorted(linear)
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ValueError(f"no linear layer named {unknown} in the language model (it has {sorted(linear)})")
    return list(targets)


def apply_lora(model, cfg: TrainConfig):
    """Wrap ``model`` in a peft LoRA model (``cfg``'s rank/alpha/dropout/targets, projector in
    ``modules_to_save``). Raises ``ValueError`` when the model has no ``multi_modal_projector``."""
    from peft import LoraConfig, get_peft_model

    if not any(n.split(".")[-1] == "multi_modal_projector" or ".multi_modal_projector." in f".{n}."
               for n, _ in model.named_modules()):
        raise ValueError(f"base model {cfg.base!r} has no multi_modal_projector (not a LLaVA-style model)")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=lora_target_regex(lora_target_modules(model, cfg.lora_targets)),
                      modules_to_save=["multi_modal_projector"])
    return get_peft_model(model, lcfg)


def _spec(cfg: TrainConfig) -> dict:
    return {"backend": "transformers", "model": cfg.base, "revision": cfg.revision}


def _load_base(cfg_or_spec, device, dtype):
    """(model, processor, resolved) of the base; the placeholder is built on this node if needed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from actors.models import materialize, resolve

    resolved = resolve(cfg_or_spec if isinstance(cfg_or_spec, dict) else _spec(cfg_or_spec))
    path = materialize(resolved)
    kw = {"revision": resolved.spec.revision} if resolved.source == "hub" and resolved.spec.revision else {}
    processor = AutoProcessor.from_pretrained(path, **kw)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kw).to(device)
    return model, processor, resolved


def _dtype(precision: str, device):
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def _probe_logits(model, batch: dict, device, dtype):
    """Last-position logits (float32, ``(vocab,)``) of row 0 of ``batch`` in eval mode."""
    import torch

    was_training = model.training
    model.eval()
    n = int(batch["attention_mask"][0].sum())
    inputs = {k: v[:1].to(device) for k, v in batch.items() if hasattr(v, "shape") and k != "labels"}
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, :n], inputs["attention_mask"][:, :n]
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=dtype == torch.bfloat16):
        logits = model(**inputs).logits[0, -1].float().cpu().clone()  # own storage: saved alone
    model.train(was_training)
    return logits


#: public names of the two helpers the DPO trainer (``actors.vlm_dpo``) shares: the base model
#: as a model spec names it (placeholders built on this node), and the reload-check probe
load_base = _load_base
probe_logits = _probe_logits


def _save(model, processor, cfg: TrainConfig, resolved, state: dict, curve: list, probe: dict) -> str:
    """Write a checkpoint into a new temporary folder and return it (rank 0 only)."""
    import torch

    tmp = tempfile.mkdtemp(prefix="mirror-llava-ckpt-")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "base.json"), "w") as f:
        json.dump({"spec": _spec(cfg), "resolved": resolved.describe(), "config": cfg.model_dump(),
                   "global_step": state["global_step"]}, f, indent=2)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "loss_curve.json"), "w") as f:
        json.dump(curve, f)
    torch.save(probe, os.path.join(tmp, "reload_check.pt"))
    return tmp


def _restore(ckpt, model, optimizer, cfg: TrainConfig) -> tuple[dict, list]:
    """Load adapter weights and optimizer state from a Ray checkpoint; returns (state, curve).
    Raises ``ValueError`` when the checkpoint belongs to another base model or LoRA shape."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        meta = json.load(open(os.path.join(d, "base.json")))
        old = meta["config"]
        for key in ("base", "revision", "lora_rank", "lora_alpha", "lora_targets"):
            if old.get(key) != getattr(cfg, key):
                raise ValueError(f"the output's checkpoint was trained with {key}={old.get(key)!r}, this run asks "
                                 f"for {getattr(cfg, key)!r}: use another --output to start a new run")
        weights = load_file(os.path.join(d, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint adapter has unexpected keys: {result.unexpected_keys[:3]}")
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
        curve = json.load(open(os.path.join(d, "loss_curve.json")))
    optimizer.load_state_dict(state["optimizer"])
    return state, curve


def train_loop(config: dict) -> None:
    """Ray Train per-worker loop (``TorchTrainer(train_loop, train_loop_config=...)``).

    ``config``: ``cfg`` (``TrainConfig`` dict), ``rows_per_worker`` (int), ``probe`` (one
    ``read_records`` row whose logits are stored with every checkpoint). Reads the ``train``
    dataset shard; reports ``step``, ``epoch``, ``loss``, ``lr``, ``step_s``, ``samples``,
    ``answer_tokens`` every step and a checkpoint every ``save_steps`` and at the end.
    """
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["cfg"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = _dtype(cfg.precision, device)
    model, processor, resolved = _load_base(cfg, device, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg)
    for p in model.parameters():  # trainable weights in fp32 under bf16 autocast (frozen base stays bf16)
        if p.requires_grad:
            p.data = p.data.float()
    proj = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate},
                                   {"params": proj, "lr": cfg.projector_lr, "base_lr": cfg.projector_lr}],
                                  weight_decay=cfg.weight_decay)
    collate = Collator(processor, cfg.max_length, cfg.append_eos)
    probe_batch = collate([config["probe"]])

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0}
    curve: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state, curve = _restore(ckpt, model, optimizer, cfg)
        for g, lr in zip(optimizer.param_groups, (cfg.learning_rate, cfg.projector_lr)):
            g["base_lr"] = lr  # load_state_dict brought back the old run's values
    resumed_from = state["global_step"]
    model = ray.train.torch.prepare_model(model) if world > 1 else model
    core = model.module if hasattr(model, "module") else model

    steps_per_epoch = max(1, math.ceil(config["rows_per_worker"] / cfg.batch_size))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total)
    shard = ray.train.get_dataset_shard("train")
    model.train()

    def report(metrics: dict, save: bool) -> None:
        if not save:
            ray.train.report(metrics)
            return
        tmp = None
        if rank == 0:
            st = {**state, "optimizer": optimizer.state_dict()}
            probe = {"question_id": config["probe"]["question_id"], "dtype": str(dtype).removeprefix("torch."),
                     "logits": _probe_logits(core, probe_batch, device, dtype)}
            tmp = _save(core, processor, cfg, resolved, st, curve, probe)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if tmp else None)
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

    saved = False
    while state["global_step"] < total:
        skip, seen = state["batches_in_epoch"], 0
        it = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=1,
                                local_shuffle_buffer_size=max(cfg.batch_size, 256) if cfg.shuffle else None,
                                local_shuffle_seed=cfg.seed + state["epoch"] if cfg.shuffle else None)
        for k, raw in enumerate(it):
            seen += 1
            if k < skip:
                continue
            if state["global_step"] >= total:
                break
            t0 = time.perf_counter()
            batch = collate(raw)
            n = int(batch["input_ids"].shape[0])
            inputs = {k2: v.to(device) for k2, v in batch.items() if hasattr(v, "shape")}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            factor = lr_factor(state["global_step"], warmup, total)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach().float()
            if world > 1:
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
            state["global_step"] += 1
            state["batches_in_epoch"] = k + 1
            state["samples"] += n * world
            step_s = time.perf_counter() - t0
            point = {"step": state["global_step"], "epoch": state["epoch"], "loss": float(value),
                     "lr": cfg.learning_rate * factor, "step_s": round(step_s, 4), "samples": n * world,
                     "answer_tokens": batch["answer_tokens"], "truncated": batch["truncated"]}
            curve.append(point)
            save = state["global_step"] % cfg.save_steps == 0 or state["global_step"] >= total
            saved = saved or save
            report({**point, "resumed_from_step": resumed_from, "total_steps": total}, save)
        else:  # the epoch's data ran out
            if seen == 0:
                raise ValueError(f"worker {rank}: the train dataset shard is empty")
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            continue
        break
    if not saved:  # resumed with nothing left to do: report the restored position again
        report({"step": state["global_step"], "resumed_from_step": resumed_from, "total_steps": total}, True)


def load_finetuned(ckpt_dir: str, device: str = "cpu", dtype=None):
    """Reload a checkpoint folder: the base named in its ``base.json`` (resolved again, so a
    placeholder or hub id works on any machine) with the peft adapter over it, in eval mode.

    Returns ``(model, processor, meta)``; ``meta`` is ``base.json``. Raises
    ``FileNotFoundError`` when the folder has no ``base.json``."""
    import torch
    from peft import PeftModel

    meta_path = os.path.join(ckpt_dir, "base.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{ckpt_dir}: no base.json (not a mirror-llava-train checkpoint)")
    meta = json.load(open(meta_path))
    base, _, _ = _load_base(meta["spec"], torch.device(device), dtype or torch.float32)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt_dir)
    model = PeftModel.from_pretrained(base, ckpt_dir).to(device).eval()
    return model, processor, meta


def check_reload(ckpt_dir: str, probe: dict) -> dict[str, Any]:
    """Reload ``ckpt_dir`` over its base (``load_finetuned``) and compare the last-position
    logits of ``probe`` (the ``read_records`` row the workers used) with those the worker stored
    in ``reload_check.pt``. Returns ``{question_id, max_abs_diff, identical}``, or
    ``{question_id, skipped}`` when the worker ran in another dtype than float32 (the CPU reload
    could not match it bit for bit). Raises ``ValueError`` when the stored probe is another
    record."""
    import torch

    stored = torch.load(os.path.join(ckpt_dir, "reload_check.pt"), map_location="cpu")
    if stored["question_id"] != probe["question_id"]:
        raise ValueError(f"checkpoint probe is {stored['question_id']!r}, not {probe['question_id']!r}")
    if stored.get("dtype", "float32") != "float32":
        return {"question_id": probe["question_id"],
                "skipped": f"worker ran in {stored['dtype']}; reload check needs a float32 run"}
    model, processor, meta = load_finetuned(ckpt_dir)
    logits = _probe_logits(model, Collator(processor, meta["config"]["max_length"],
                                           meta["config"].get("append_eos", "never"))([probe]),
                           torch.device("cpu"), torch.float32)
    diff = float((logits - stored["logits"]).abs().max())
    return {"question_id": probe["question_id"], "max_abs_diff": diff, "identical": diff == 0.0}
