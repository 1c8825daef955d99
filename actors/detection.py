"""Open-vocabulary detection stage (Grounding DINO via transformers): Antidote steps 2-2/2-3.

``GroundingDINO`` detects, per image, the object names of one or more phrase-list columns
(Antidote: ``present`` and ``no_exist``, SPEC C4: two ``predict`` calls per image) and maps
the detected phrases back to the requested names with ``udfs.phrases.match_phrases``
(``robust`` by default; ``strict`` reproduces the original's exact string membership,
SPEC C5/C11.6).

Batching: each image is loaded and preprocessed once per row and reused for every phrase
column. Each phrase column costs one forward pass per group of equally sized images in the
batch. Images are never padded together: padding would change the Swin backbone's
features at the borders, so a batched row would score differently from the same row
alone (and from the original, which ran one image at a time). Generated images all have
one size, so an Antidote batch is one pass per phrase column.

Generation cache (``cache={"uri": ...}``, ``actors.gen_cache``): the raw detections of one
image and one phrase column are stored under a key of the model identity, the image's bytes
(hashed), the caption and the thresholds and sizes; the name matching runs again on a hit, so a
change of ``match``/``partial`` reuses the detections. The model loads on the first miss only.
Per row ``det_cache_hits``/``det_cache_misses`` count the phrase columns served from the cache /
looked up, detected and stored.

Prompt per row and column: the names lower-cased, ``"."`` removed from each name,
joined as ``"cat. hot dog."`` (the transformers processor's format; the original's
``" . ".join(names)`` tokenizes the same). Tokens beyond the model's ``max_text_len``
(256 for the released checkpoints) are truncated, and names cut off there cannot be
detected.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.batching import (batch_len, cell_strings, error_text, group_by, object_column, row_ids,
                             run_halving_on_oom, set_threads)
from actors.gen_cache import cache_key, digest, model_identity, open_cache
from actors.models import load_spec
from udfs import rows
from udfs.images import decode_image, image_bytes
from udfs.phrases import match_phrases

__all__ = ["GroundingDINO", "build_caption"]


def build_caption(names: list[str]) -> str:
    """Grounding DINO text prompt for ``names``: ``["Cat", "hot dog"]`` -> ``"cat. hot dog."``."""
    cleaned = [" ".join(n.replace(".", " ").lower().split()) for n in names]
    return ". ".join(c for c in cleaned if c) + "."


def _round_box(box) -> list[float]:
    return [round(float(v), 2) for v in box]


class GroundingDINO:
    """Zero-shot detection of per-row object names with Grounding DINO.

    Input columns: ``id``, the image column (``image``: path/URI string or encoded bytes,
    see ``udfs.images.load_image``) and every column of ``phrase_columns`` (each cell a
    list of object names; null or empty -> nothing to detect).

    Output columns, for each phrase column ``c`` (``None`` where the row failed):

    - ``{c}_detected`` (list[str]): the requested names that were detected, in request order;
    - ``{c}_scores`` (str, JSON ``{name: score}``): best box score (max token probability,
      0..1) among the detections credited to each detected name;
    - ``{c}_boxes`` (str, JSON ``{name: [[x0, y0, x1, y1], ...]}``): boxes credited to each
      detected name, absolute pixel coordinates of the (EXIF-oriented) input image, xyxy;
    - ``{c}_raw`` (str, JSON list of ``{"label", "score", "box"}``): every detection above
      ``box_threshold`` with Grounding DINO's own label text.

    plus ``det_cache_hits``/``det_cache_misses`` (int: phrase columns of the row served from the
    generation cache / detected and stored there; 0 without a cache) and ``rows.ROW_ERROR`` (``None`` or ``"InputError: row 'x' field 'image':
    image file not found: /data/x.jpg"`` for a missing/corrupt image or a malformed phrase list).
    """

    #: the runtime passes the run's generation cache config (``cache=``)
    supports_cache = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image_column: str = Field("image", description="Column holding the image (path/URI or bytes).")
        phrase_columns: list[str] = Field(["present", "no_exist"], min_length=1, description="Columns holding "
                                          "lists of object names; each is detected in its own pass (Antidote "
                                          "runs DINO twice per image: present and no-exist objects, SPEC C4).")
        box_threshold: float = Field(0.25, ge=0.0, le=1.0, description="Keep boxes whose best token probability "
                                     "exceeds this (SPEC C4: 0.25; transformers calls it `threshold`).")
        text_threshold: float = Field(0.35, ge=0.0, le=1.0, description="Tokens whose probability exceeds this "
                                      "form a box's label (SPEC C4: 0.35).")
        match: str = Field("robust", pattern="^(robust|strict)$", description="Phrase mapping: `robust` "
                           "(case, plurals, merged and sub-word labels; udfs.phrases) or `strict` (the "
                           "original's exact string membership, SPEC C5).")
        partial: str = Field("head", pattern="^(head|none|any)$", description="Robust mode: which partial "
                             "labels credit a name (udfs.phrases.match_phrases).")
        image_size: int | None = Field(800, ge=16, description="Resize so the shorter side is this many px "
                                       "(SPEC C4: 800); None = the processor's saved setting. The offline "
                                       "recipe and tests use a small size.")
        max_size: int | None = Field(1333, ge=16, description="Upper bound for the longer side after resizing "
                                     "(SPEC C4: 1333).")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor (None: "
                                        "leave Ray's per-actor setting).")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        outs = [f"{c}_{suffix}" for c in p.phrase_columns for suffix in ("detected", "scores", "boxes", "raw")]
        return [rows.ID, p.image_column, *p.phrase_columns], [*outs, "det_cache_hits", "det_cache_misses"]

    def __init__(self, model: dict, params: dict, cache: dict | None = None):
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, self._path = load_spec(model, ("grounding_dino", "transformers"),
                                                                       "GroundingDINO")
        self.placeholder = self.resolved.placeholder
        self.cache = open_cache(cache)
        self._identity = model_identity(self.resolved)
        self.model = None
        if self.cache is None:
            self._load()

    def _load(self) -> None:
        """Load the processor and the model (once; with a cache, at the first miss)."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        spec = self.resolved.spec
        kwargs = {"revision": spec.revision} if spec.revision else {}
        self.processor = AutoProcessor.from_pretrained(self._path, **kwargs)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self._path, dtype=self.dtype, **kwargs)
        self.model.to(self.device).eval()
        ip = self.processor.image_processor
        if self.params.image_size:
            longest = self.params.max_size or max(self.params.image_size, 1333)
            ip.size = {"shortest_edge": self.params.image_size, "longest_edge": longest}
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))
        self._torch = torch

    def _key(self, image_digest: str, caption: str) -> str:
        p = self.params
        return cache_key({"kind": "detection", "model": self._identity, "image": image_digest, "caption": caption,
                          "box_threshold": p.box_threshold, "text_threshold": p.text_threshold,
                          "image_size": p.image_size, "max_size": p.max_size})

    # -- model calls ---------------------------------------------------------------------

    def _detect(self, pixel_values, captions: list[str], sizes: list[tuple[int, int]]) -> list[list[dict]]:
        """One forward pass: images (same size) x captions -> per image a list of detections."""
        torch = self._torch
        p = self.params
        text = self.processor.tokenizer(captions, padding=True, truncation=True, max_length=self.max_text_len,
                                        return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in text.items()}
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixel_values.to(self.device, self.dtype), **inputs)
            outputs.logits = outputs.logits.float()
            outputs.pred_boxes = outputs.pred_boxes.float()
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=p.box_threshold, text_threshold=p.text_threshold,
                target_sizes=sizes)
        dets = []
        for res in results:
            dets.append([{"label": str(label), "score": round(float(score), 6), "box": _round_box(box)}
                         for label, score, box in zip(res["text_labels"], res["scores"].tolist(),
                                                      res["boxes"].tolist())])
        return dets

    def _summarize(self, names: list[str], dets: list[dict]) -> tuple[list[str], str, str, str]:
        p = self.params
        mapping = match_phrases(names, [d["label"] for d in dets], mode=p.match, partial=p.partial)
        detected, scores, boxes = [], {}, {}
        for name in names:
            idx = mapping.get(name, [])
            if idx and name not in scores:
                detected.append(name)
                scores[name] = max(dets[j]["score"] for j in idx)
                boxes[name] = [dets[j]["box"] for j in idx]
        dump = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))  # noqa: E731
        return detected, dump(scores), dump(boxes), dump(dets)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Detect every phrase column of the batch (see the class docstring for columns)."""
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        names: dict[str, list[list[str]]] = {c: [[] for _ in range(n)] for c in p.phrase_columns}
        data: list[tuple[bytes, str] | None] = [None] * n  # (encoded image, its source for messages)
        keys: dict[tuple[int, str], str] = {}
        found: dict[tuple[int, str], list[dict]] = {}  # (row, column) -> detections from the cache
        for i, rid in enumerate(ids):
            try:
                for c in p.phrase_columns:
                    if c not in batch:
                        raise rows.InputError(rid, c, "phrase column missing from the batch")
                    names[c][i] = cell_strings(batch[c][i], rid, c)
                if not any(names[c][i] for c in p.phrase_columns):
                    continue  # nothing to detect: no image needed
                data[i] = image_bytes(batch[p.image_column][i], rid, p.image_column)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
                continue
            if self.cache is not None:
                image_digest = digest(data[i][0])
                for c in p.phrase_columns:
                    if names[c][i]:
                        keys[i, c] = self._key(image_digest, build_caption(names[c][i]))
                        entry = self.cache.get(keys[i, c])
                        if entry is not None and isinstance(entry.get("detections"), list):
                            # stored with sorted keys: back in the fresh order, so outputs are equal
                            found[i, c] = [{"label": d["label"], "score": d["score"], "box": d["box"]}
                                           for d in entry["detections"]]
        hits = [sum(1 for c in p.phrase_columns if (i, c) in found) for i in range(n)]
        misses = [0] * n
        pixels: list[Any] = [None] * n
        sizes: list[tuple[int, int] | None] = [None] * n
        for i, rid in enumerate(ids):  # decode and preprocess only the images some column still needs
            if data[i] is None or all((i, c) in found for c in p.phrase_columns if names[c][i]):
                continue
            try:
                img = decode_image(*data[i], rid, p.image_column)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
                continue
            self._load()
            pixels[i] = self.processor.image_processor(images=img, return_tensors="pt")["pixel_values"]
            sizes[i] = (img.height, img.width)
        out = dict(batch)
        for c in p.phrase_columns:
            todo = [i for i in range(n) if errors[i] is None and names[c][i] and (i, c) not in found]
            per_row: dict[int, list[dict] | BaseException] = {i: found[i, c] for i in range(n) if (i, c) in found}
            # one forward pass per group of equally sized images (never pad images together)
            for _shape, members in group_by([tuple(pixels[i].shape[-2:]) for i in todo]).items():
                rows_in = [todo[j] for j in members]

                def run(chunk: list[int]) -> list[list[dict]]:
                    pv = self._torch.cat([pixels[i] for i in chunk])
                    return self._detect(pv, [build_caption(names[c][i]) for i in chunk], [sizes[i] for i in chunk])

                for i, res in zip(rows_in, run_halving_on_oom(run, rows_in)):
                    per_row[i] = res
                    if self.cache is not None and not isinstance(res, BaseException):
                        self.cache.put(keys[i, c], {"detections": res})
                        misses[i] += 1
            detected, scores, boxes, raw = ([None] * n for _ in range(4))
            for i in range(n):
                if errors[i] is not None:
                    continue
                res = per_row.get(i, [])
                if isinstance(res, BaseException):
                    errors[i] = f"{type(res).__name__}: row {ids[i]!r}: out of memory even alone: {res}"
                    continue
                detected[i], scores[i], boxes[i], raw[i] = self._summarize(names[c][i], res)
            out[f"{c}_detected"] = object_column(detected)
            out[f"{c}_scores"] = object_column(scores)
            out[f"{c}_boxes"] = object_column(boxes)
            out[f"{c}_raw"] = object_column(raw)
        # rows that failed in a later column must not keep results of an earlier one
        for c in p.phrase_columns:
            for suffix in ("detected", "scores", "boxes", "raw"):
                col = out[f"{c}_{suffix}"]
                for i in range(n):
                    if errors[i] is not None:
                        col[i] = None
        out["det_cache_hits"] = np.array(hits, dtype=np.int64)
        out["det_cache_misses"] = np.array(misses, dtype=np.int64)
        out[rows.ROW_ERROR] = object_column(errors)
        return out
