"""CLIP scoring stage (open_clip): MIRROR's CLIP filter (image-text cosine) and MM-GEN's
zero-shot keyword partition (SPEC A8, D2, D3).

Model specs (backend ``open_clip``):

- an open_clip architecture name with ``options.pretrained`` (``ViT-B-32`` + ``openai``);
- an open_clip hub id ``hf-hub:org/name`` (a repo with ``open_clip_config.json``);
- the transformers CLIP ids the originals name, mapped to the same OpenAI weights in
  open_clip (``openai/clip-vit-large-patch14`` -> ``ViT-L-14`` / ``openai``, see
  ``HF_CLIP_ALIASES``);
- a local folder in open_clip's local-dir layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), e.g. the ``placeholder:tiny-clip`` model.

Scores are raw cosine similarities of L2-normalised embeddings (no ``logit_scale``, no
softmax), range -1..1: MIRROR thresholds the cosine at 0.2 and MM-GEN takes the argmax
over raw keyword strings without prompt templates.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.batching import (batch_len, error_text, is_missing, object_column, row_ids, run_halving_on_oom,
                             set_threads)
from actors.models import ResolvedModel, load_spec
from udfs import rows
from udfs.images import load_image
from udfs.mmgen import assign_keywords

__all__ = ["CLIPScorer", "clip_model_name", "clip_pretrained", "HF_CLIP_ALIASES"]

#: transformers CLIP checkpoints of the originals -> the same OpenAI weights in open_clip.
HF_CLIP_ALIASES: dict[str, tuple[str, str]] = {
    "openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
    "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
}


def clip_model_name(resolved: ResolvedModel) -> str:
    """The open_clip model identifier for a resolved spec.

    ``local-dir:<folder>`` for placeholders and local folders, ``hf-hub:org/name`` for
    hub repos (an ``org/name`` id without the prefix gets it), the architecture name for
    aliases and built-in names (``ViT-B-32``).
    """
    path = resolved.path
    if resolved.source in ("placeholder", "path"):
        return f"local-dir:{path}"
    if path in HF_CLIP_ALIASES:
        return HF_CLIP_ALIASES[path][0]
    if path.startswith(("hf-hub:", "local-dir:")):
        return path
    if "/" in path:
        return f"hf-hub:{path}"
    return path


def clip_pretrained(resolved: ResolvedModel) -> str | None:
    """The ``pretrained`` tag/file for built-in architecture names (``options.pretrained``),
    the alias's tag for mapped transformers ids, ``None`` for local-dir and hf-hub models
    (their weights come with them)."""
    if resolved.path in HF_CLIP_ALIASES and resolved.source == "hub":
        return HF_CLIP_ALIASES[resolved.path][1]
    name = clip_model_name(resolved)
    if name.startswith(("local-dir:", "hf-hub:")):
        return None
    return resolved.spec.options.get("pretrained")


def _precision(dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


class CLIPScorer:
    """Image-text cosine similarity and zero-shot keyword assignment with open_clip.

    ``mode="similarity"``: input columns ``id``, the image column and ``text_column`` (a
    string, or a list of strings, per image). Outputs ``clip_scores`` (list[float]: one
    cosine per text, in order; the image is embedded once and reused for all its texts) and,
    with ``return_embeddings``, ``clip_image_embedding`` (list[float], L2-normalised,
    ``embed_dim`` long) and ``clip_text_embeddings`` (list of such lists, one per text).

    ``mode="zero_shot"``: input columns ``id`` and the image column; outputs ``keyword``
    (str: the keyword with the highest cosine) and ``keyword_scores`` (str, JSON
    ``{keyword: cosine}``); plus ``clip_image_embedding`` with ``return_embeddings``. The
    keyword embeddings are computed once when the actor starts.

    Both: ``rows.ROW_ERROR`` is ``None`` or ``"InputError: row 'x' field 'image': ..."``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mode: str = Field("similarity", pattern="^(similarity|zero_shot)$",
                          description="`similarity` (image-text cosine, MIRROR's CLIP filter) or `zero_shot` "
                                      "(argmax keyword, MM-GEN stage 1).")
        image_column: str = Field("image", description="Column holding the image (path/URI or bytes).")
        text_column: str = Field("text", description="similarity mode: column holding a string or a list of "
                                 "strings per image.")
        keywords: list[str] = Field(default_factory=list, description="zero_shot mode: the keywords (MM-GEN: "
                                    "e.g. ['bar chart', 'pie chart', 'line chart'], SPEC D2).")
        keyword_template: str = Field("{}", description="zero_shot mode: text encoded per keyword; MM-GEN "
                                      "encodes the raw keyword (SPEC D2), i.e. '{}'.")
        return_embeddings: bool = Field(False, description="Also output the L2-normalised embeddings.")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor (None: "
                                        "leave Ray's per-actor setting).")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        if p.mode == "similarity":
            ins, outs = [rows.ID, p.image_column, p.text_column], ["clip_scores"]
            if p.return_embeddings:
                outs += ["clip_image_embedding", "clip_text_embeddings"]
        else:
            ins, outs = [rows.ID, p.image_column], ["keyword", "keyword_scores"]
            if p.return_embeddings:
                outs.append("clip_image_embedding")
        return ins, outs

    def __init__(self, model: dict, params: dict):
        import open_clip
        import torch

        self.params = self.Params.model_validate(params)
        if self.params.mode == "zero_shot" and not self.params.keywords:
            raise ValueError("CLIPScorer zero_shot mode needs params.keywords")
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, _ = load_spec(model, ("open_clip",), "CLIPScorer")
        self.placeholder = self.resolved.placeholder
        self.model_name = clip_model_name(self.resolved)
        pretrained = clip_pretrained(self.resolved)
        if not self.model_name.startswith(("local-dir:", "hf-hub:")) and not pretrained:
            raise ValueError(f"open_clip architecture {self.model_name!r} needs options.pretrained "
                             "(e.g. 'openai'); refusing to run with random weights")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=pretrained, precision=_precision(self.dtype), device=self.device,
            require_pretrained=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self._torch = torch
        self.keyword_embeddings = None
        if self.params.mode == "zero_shot":
            texts = [self.params.keyword_template.format(k) for k in self.params.keywords]
            self.keyword_embeddings = self._encode_texts(texts)

    # -- encoders ------------------------------------------------------------------------

    def _encode_texts(self, texts: list[str]):
        """``[len(texts), embed_dim]`` float32 L2-normalised text embeddings (one forward pass)."""
        torch = self._torch
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float()

    def _encode_images(self, tensors: list) -> list:
        torch = self._torch
        with torch.inference_mode():
            x = torch.stack(tensors).to(self.device, self.dtype)
            return list(self.model.encode_image(x, normalize=True).float())

    # -- batch ---------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Score the batch: one image forward pass, one text forward pass (similarity mode)."""
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        tensors: dict[int, Any] = {}
        texts: dict[int, list[str]] = {}
        for i, rid in enumerate(ids):
            try:
                if p.mode == "similarity":
                    texts[i] = self._row_texts(batch, i, rid)
                img = load_image(batch[p.image_column][i], rid, p.image_column)
                tensors[i] = self.preprocess(img)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
                texts.pop(i, None)
        order = list(tensors)
        embs = run_halving_on_oom(self._encode_images, [tensors[i] for i in order])
        image_emb: dict[int, Any] = {}
        for i, e in zip(order, embs):
            if isinstance(e, BaseException):
                errors[i] = f"{type(e).__name__}: row {ids[i]!r}: out of memory even alone: {e}"
            else:
                image_emb[i] = e
        out = dict(batch)
        img_col: list[Any] = [None] * n
        if p.mode == "similarity":
            unique = list(dict.fromkeys(t for i in image_emb for t in texts[i]))
            text_emb = self._encode_texts(unique) if unique else None
            pos = {t: j for j, t in enumerate(unique)}
            scores: list[Any] = [None] * n
            txt_col: list[Any] = [None] * n
            for i, e in image_emb.items():
                idx = [pos[t] for t in texts[i]]
                if idx:
                    te = text_emb[idx]
                    scores[i] = (te @ e).tolist()
                    txt_col[i] = te.cpu().numpy().astype(np.float32).tolist()
                else:
                    scores[i], txt_col[i] = [], []
                img_col[i] = e.cpu().numpy().astype(np.float32).tolist()
            out["clip_scores"] = object_column(scores)
            if p.return_embeddings:
                out["clip_image_embedding"] = object_column(img_col)
                out["clip_text_embeddings"] = object_column(txt_col)
        else:
            keyword: list[Any] = [None] * n
            kw_scores: list[Any] = [None] * n
            for i, e in image_emb.items():
                sims = (self.keyword_embeddings @ e).tolist()
                keyword[i] = p.keywords[int(assign_keywords(np.array([sims]))[0])]  # ties: first keyword
                kw_scores[i] = json.dumps({k: round(float(s), 6) for k, s in zip(p.keywords, sims)},
                                          ensure_ascii=False, separators=(",", ":"))
                img_col[i] = e.cpu().numpy().astype(np.float32).tolist()
            out["keyword"] = object_column(keyword)
            out["keyword_scores"] = object_column(kw_scores)
            if p.return_embeddings:
                out["clip_image_embedding"] = object_column(img_col)
        out[rows.ROW_ERROR] = object_column(errors)
        return out

    def _row_texts(self, batch: dict, i: int, rid: str) -> list[str]:
        col = self.params.text_column
        if col not in batch:
            raise rows.InputError(rid, col, "text column missing from the batch")
        value = batch[col][i]
        if is_missing(value):
            raise rows.InputError(rid, col, "no text (value is null)")
        if isinstance(value, str):
            return [value]
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
            return list(value)
        raise rows.InputError(rid, col, f"expected a string or a list of strings, got {type(value).__name__}")
