"""Vision-language models with transformers: loading, batch encoding, per-sample answer loss.

Shared by the LLM stage's transformers backend (generation with image parts,
``actors.llm_hf``) and the loss filter of MM-GEN (``AnswerLoss``, SPEC D7). Any model that
``AutoModelForImageTextToText`` + ``AutoProcessor`` load works (LLaVA-1.5, LLaVA-interleave,
Qwen2-VL, the ``placeholder:tiny-llava`` model).

Traps handled here (measured in notes/mmgen-vlm.md):

- the processor checks only the **total** number of images of a batch, and silently shifts
  images between rows when a row's count is wrong: ``encode`` checks every row (T3);
- ``out.loss`` is the token-weighted batch mean and pad == eos: ``answer_losses`` computes
  each sample's mean NLL itself, masking by the attention mask, never by token id (T7);
- left padding plus ``logits_to_keep`` keeps only the answer tail of the logits, so batched
  losses equal one-by-one losses (to ~1e-6) at 3-5x the throughput (§4).
"""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.batching import batch_len, error_text, is_missing, object_column, row_ids, set_threads
from actors.models import load_spec
from udfs import rows
from udfs.images import load_image_ref

__all__ = ["is_vision_config", "load_vlm", "image_token", "encode", "ImageCache", "AnswerLoss",
           "answer_losses", "record_messages"]


def is_vision_config(path: str, **kw: Any) -> bool:
    """True when the model folder / hub id at ``path`` is a vision-language model (its config
    has a ``vision_config``). Reads only the config."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, **kw), "vision_config", None) is not None


def load_vlm(path: str, device, dtype, **kw: Any):
    """``(model, processor)`` from ``AutoModelForImageTextToText`` / ``AutoProcessor`` (eval
    mode, on ``device``). The processor's tokenizer pads on the left."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, **kw)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    return model, processor


def image_token(processor) -> str:
    """The text token that stands for one image in the processor's prompts (``<image>`` for
    LLaVA, ``<|image_pad|>`` for Qwen2-VL)."""
    return getattr(processor, "image_token", None) or "<image>"


def encode(processor, texts: list[str], images: list[list[Any]], row_ids_: list[str] | None = None):
    """Tokenize a batch of templated prompts with their images (left padding, PyTorch tensors).

    ``images[i]`` are the PIL images of row ``i`` in prompt order. Raises ``rows.InputError``
    (naming the row) when a row's number of image tokens differs from its number of images
    (the processor would silently move images between rows). Rows without images are allowed
    only when no row of the batch has images (call separately per group).
    """
    tok = image_token(processor)
    for i, (text, imgs) in enumerate(zip(texts, images)):
        if text.count(tok) != len(imgs):
            rid = row_ids_[i] if row_ids_ else f"#{i}"
            raise rows.InputError(rid, "messages", f"prompt has {text.count(tok)} image tokens but "
                                  f"{len(imgs)} images")
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if any(images):
        if not all(images):
            raise ValueError("encode: mix of rows with and without images; encode them separately")
        kwargs["images"] = [im for row in images for im in row]
    try:
        return processor(**kwargs, padding_side="left")
    except TypeError:  # processors without per-call padding_side
        return processor(**kwargs)


class ImageCache:
    """Decoded RGB images by reference, LRU-cached per actor, so an in-context example image
    shared by many prompts is read and decoded once."""

    def __init__(self, size: int = 256):
        self._load = functools.lru_cache(maxsize=size)(lambda ref: load_image_ref(ref, "?", "image"))

    def get(self, ref: str, row_id: str, field: str):
        """The image for ``ref``. Raises ``rows.InputError`` naming ``row_id`` and ``field``."""
        try:
            return self._load(ref)
        except rows.InputError as e:
            raise rows.InputError(row_id, field, e.problem) from None


def record_messages(conversations: list[dict[str, Any]], has_image: bool) -> tuple[list[dict], dict]:
    """LLaVA ``conversations`` → (chat messages of the prompt, the final assistant message).

    ``from`` ``human``/``user`` → role ``user``, ``gpt``/``assistant`` → ``assistant``. The
    ``<image>`` placeholder is removed from the text; when ``has_image`` an image part is put
    first in the first user turn (LLaVA's layout). The last turn must be the assistant's: its
    text is the answer whose loss is measured. Raises ``ValueError`` otherwise.
    """
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    msgs = []
    for k, turn in enumerate(conversations):
        role = roles.get(str(turn.get("from")))
        if role is None:
            raise ValueError(f"turn {k}: unknown speaker {turn.get('from')!r}")
        text = str(turn.get("value", "")).replace("<image>", "").strip()
        if role == "user" and has_image and not any(m["role"] == "user" for m in msgs):
            msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            msgs.append({"role": role, "content": [{"type": "text", "text": text}]})
    if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise ValueError("a sample needs at least one user turn followed by a final assistant turn")
    return msgs[:-1], msgs[-1]


def answer_losses(model, processor, samples: list[tuple[list[dict], dict, list[Any]]],
                  row_ids_: list[str] | None = None) -> list[tuple[float, int]]:
    """Mean negative log-likelihood of each sample's answer tokens, in one forward pass.

    ``samples``: ``(prompt messages, assistant message, images)`` per sample (HF chat-template
    messages; ``images`` are PIL images, all samples of one call either with or without
    images). The full text is the chat template over prompt + answer with the template's
    trailing newline removed, so the last counted token is the end-of-turn token; prompt
    tokens and padding (by attention mask) are masked. Returns ``(loss, answer_tokens)`` per
    sample (float nats/token, int). Batched results equal one-by-one results up to float
    rounding (left padding; RoPE positions are shift-invariant). Raises ``ValueError`` when the
    template's prompt is not a prefix of the full conversation (the loss would be misaligned).
    """
    import torch
    import torch.nn.functional as F

    fulls = [processor.apply_chat_template([*p, a], tokenize=False).rstrip("\n") for p, a, _ in samples]
    prompts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _, _ in samples]
    images = [imgs for _, _, imgs in samples]
    enc = encode(processor, fulls, images, row_ids_)
    penc = encode(processor, prompts, images, row_ids_)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_real = mask.sum(1).tolist()
    n_prompt = penc["attention_mask"].sum(1).tolist()
    L = ids.shape[1]
    Lp = penc["input_ids"].shape[1]
    labels = ids.clone()
    labels[mask == 0] = -100
    for i in range(len(samples)):
        start = L - n_real[i]
        full_ids = ids[i, start:start + n_prompt[i]]
        prompt_ids = penc["input_ids"][i, Lp - n_prompt[i]:]
        if n_prompt[i] >= n_real[i] or not torch.equal(full_ids, prompt_ids):
            rid = row_ids_[i] if row_ids_ else f"#{i}"
            raise ValueError(f"sample {rid}: the chat template's prompt is not a prefix of the full conversation")
        labels[i, start:start + n_prompt[i]] = -100
    first = int((labels != -100).any(0).nonzero().min())  # >= 1: every sample has prompt tokens
    with torch.inference_mode():
        # the last L - first + 1 positions: position t predicts token t + 1, so positions
        # first-1 .. L-2 predict the labelled tokens first .. L-1 (the final position is dropped)
        logits = model(**enc, logits_to_keep=L - first + 1).logits[:, :-1].float()
    target = labels[:, first:]
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    m = target != -100
    counts = m.sum(1)
    loss = (nll * m).sum(1) / counts.clamp(min=1)
    return [(float(loss[i]), int(counts[i])) for i in range(len(samples))]


class AnswerLoss:
    """Ray Data actor: per-sample answer loss of LLaVA-format records under a target VLM.

    MM-GEN's stage 4 (SPEC D7; never released as a script): the target/base model's
    per-sample training loss on the generated data, used to keep the highest-loss half. Input
    columns: ``id``, ``records_column`` (JSON string or list of LLaVA records, each with
    ``conversations``; a record with an ``image_1`` key is paired with the row's image) and
    ``image_column`` (path/URI of the row's image). Outputs ``answer_loss`` (list[float], one
    mean NLL in nats/token per record, in order) and ``answer_tokens`` (list[int]). All records
    of a batch are scored together in chunks of ``max_batch_size`` samples (with-image and
    text-only samples in separate calls). A row whose image or records are invalid gets
    ``rows.ROW_ERROR`` naming the row and field.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        records_column: str = Field("records", description="Column with the row's LLaVA records (JSON list).")
        image_column: str = Field("candidate", description="Column with the image path/URI of records that "
                                  "have image_1.")
        max_batch_size: int = Field(8, ge=1, description="Samples per forward pass.")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor.")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        return [rows.ID, p.records_column, p.image_column], ["answer_loss", "answer_tokens"]

    def __init__(self, model: dict, params: dict):
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, device, dtype, path = load_spec(model, ("transformers",), "AnswerLoss")
        kw = {"trust_remote_code": bool(self.resolved.spec.options.get("trust_remote_code", False))}
        if self.resolved.source == "hub" and self.resolved.spec.revision:
            kw["revision"] = self.resolved.spec.revision
        self.model, self.processor = load_vlm(path, device, dtype, **kw)
        self.images = ImageCache()

    def _records(self, cell: Any, rid: str) -> list[dict]:
        field = self.params.records_column
        if is_missing(cell):
            raise rows.InputError(rid, field, "no records (value is null)")
        if isinstance(cell, str):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError as e:
                raise rows.InputError(rid, field, f"not valid JSON: {e}") from None
        if not isinstance(cell, list) or not all(isinstance(r, dict) and r.get("conversations") for r in cell):
            raise rows.InputError(rid, field, "expected a list of records with 'conversations'")
        return cell

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        samples: list[tuple[int, int, tuple]] = []  # (row, record index, sample)
        counts = [0] * n
        for i, rid in enumerate(ids):
            try:
                recs = self._records(batch[p.records_column][i], rid)
                img = None
                for k, rec in enumerate(recs):
                    has_image = "image_1" in rec and rec["image_1"] is not None
                    if has_image and img is None:
                        img = self.images.get(batch[p.image_column][i], rid, p.image_column)
                    try:
                        prompt, answer = record_messages(rec["conversations"], has_image)
                    except ValueError as e:
                        raise rows.InputError(rid, p.records_column, f"record {k}: {e}") from None
                    samples.append((i, k, (prompt, answer, [img] if has_image else [])))
                counts[i] = len(recs)
            except rows.InputError as e:
                errors[i] = error_text(e)
        losses: list[list[Any]] = [[None] * c for c in counts]
        tokens: list[list[Any]] = [[None] * c for c in counts]
        live = [s for s in samples if errors[s[0]] is None]
        for with_img in (True, False):
            group = [s for s in live if bool(s[2][2]) == with_img]
            for start in range(0, len(group), p.max_batch_size):
                chunk = group[start:start + p.max_batch_size]
                try:
                    res = answer_losses(self.model, self.processor, [s[2] for s in chunk],
                                        [f"{ids[s[0]]}#{s[1]}" for s in chunk])
                except (ValueError, rows.InputError) as e:
                    for s in chunk:
                        errors[s[0]] = error_text(e)
                    continue
                for (i, k, _), (loss, ntok) in zip(chunk, res):
                    losses[i][k], tokens[i][k] = loss, ntok
        out = dict(batch)
        out["answer_loss"] = object_column([None if errors[i] else losses[i] for i in range(n)])
        out["answer_tokens"] = object_column([None if errors[i] else tokens[i] for i in range(n)])
        out[rows.ROW_ERROR] = object_column(errors)
        return out
