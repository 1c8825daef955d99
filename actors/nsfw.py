"""NSFW image classification stage: MIRROR's NSFW filter (SPEC A8, MIRROR-LLaVA check (1)).

Backends, chosen by the model spec:

- ``transformers`` (paper profile): an image classifier such as
  ``Falconsai/nsfw_image_detection`` (ViT, labels ``normal``/``nsfw``), run through
  ``transformers.pipeline("image-classification")`` with ``batch_size`` images per forward
  pass. An image is unsafe when its ``nsfw`` probability is at least its ``normal``
  probability (MIRROR ``step4/nsfw.py``: drop if ``score['nsfw'] >= score['normal']``; the
  label names are Params). Offline: ``placeholder:tiny-nsfw-vit`` (random weights, so its
  verdicts are meaningless and filters reading them run in audit mode).
- ``nudenet`` (optional extra, installed on purpose by the user: the ``nudenet`` package's
  licence file is AGPL-3.0 although its metadata says MIT, MODELS.md): NudeNet 3.4.2's
  YOLOv8n detector (model spec ``pkg:nudenet/320n.onnx`` or a path to an ONNX file),
  batched with ``NudeDetector.detect_batch``. Only the ``*_EXPOSED`` classes listed in
  Params count (``udfs.safety.nudenet_verdict``); its ``FACE_FEMALE``/``FACE_MALE``
  labels are never used. Not a dependency of this project.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.batching import batch_len, error_text, object_column, row_ids, run_halving_on_oom, set_threads
from actors.models import load_spec
from udfs import rows
from udfs.images import load_image
from udfs.safety import NUDENET_DEFAULT_CLASSES, NUDENET_EXPOSED_LABELS, nudenet_verdict

__all__ = ["NSFWClassifier", "NUDENET_MISSING"]

NUDENET_MISSING = ("NSFW backend 'nudenet' needs the optional package nudenet, which is not installed. Its "
                   "licence file is AGPL-3.0, so this project does not install it; install it on purpose "
                   "(pip install nudenet==3.4.2) or use backend 'transformers'.")


def _dump(d: dict[str, float]) -> str:
    return json.dumps({k: round(float(v), 6) for k, v in d.items()}, separators=(",", ":"))


class NSFWClassifier:
    """Per-image NSFW verdicts.

    Input columns: ``id`` and the image column (path/URI string, encoded bytes or an
    ``{"bytes", "path"}`` struct, see ``udfs.images.load_image``).

    Output columns (``None`` where the row failed):

    - ``nsfw_score`` (float, 0..1): transformers: the softmax probability of ``unsafe_label``;
      nudenet: the highest score of a counted ``*_EXPOSED`` detection (0.0 when none);
    - ``nsfw`` (bool): transformers: ``p(unsafe_label) >= p(safe_label)`` (Falconsai/MIRROR
      rule); nudenet: ``nsfw_score >= nudenet_threshold``;
    - ``nsfw_scores`` (str, JSON): transformers: ``{label: probability}`` for every label of
      the model (MIRROR's ``score{nsfw, normal}``); nudenet: ``{class: best score}`` for the
      counted classes found;

    plus ``rows.ROW_ERROR``: ``None`` or ``"InputError: row 'x' field 'image': cannot decode
    image /data/x.jpg: ..."``.

    Usable outside Ray Data (e.g. as a Ray Serve replica):
    ``NSFWClassifier(model=resolve(spec).model_dump(), params={...})({"id": [...], "image": [...]})``.
    Raises at construction: ``ValueError`` for a backend other than ``transformers``/``nudenet``
    or label names the model does not have; ``ImportError`` for ``nudenet`` when the package
    is missing.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image_column: str = Field("image", description="Column holding the image (path/URI or bytes).")
        batch_size: int = Field(16, ge=1, description="Images per forward pass (the pipeline's batch_size; "
                                "NudeNet's detect_batch batch_size).")
        unsafe_label: str = Field("nsfw", description="transformers: the model's unsafe label "
                                  "(Falconsai/nsfw_image_detection: 'nsfw').")
        safe_label: str = Field("normal", description="transformers: the model's safe label "
                                "(Falconsai/nsfw_image_detection: 'normal'). Unsafe when p(unsafe) >= p(safe).")
        nudenet_classes: list[str] = Field(list(NUDENET_DEFAULT_CLASSES), min_length=1,
                                           description="nudenet: *_EXPOSED classes that flag an image "
                                                       "(udfs.safety.NUDENET_DEFAULT_CLASSES).")
        nudenet_threshold: float = Field(0.5, ge=0.0, le=1.0, description="nudenet: a counted detection at "
                                         "or above this score flags the image. 0.5 is our default, not a "
                                         "published value (NudeNet returns boxes from 0.25).")
        nudenet_resolution: int = Field(320, ge=32, description="nudenet: detector input size in px "
                                        "(320 for 320n.onnx, NudeDetector's default).")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor (None: "
                                        "leave Ray's per-actor setting).")

        @field_validator("nudenet_classes")
        @classmethod
        def _exposed_only(cls, v: list[str]) -> list[str]:
            bad = [c for c in v if c not in NUDENET_EXPOSED_LABELS]
            if bad:
                raise ValueError(f"nudenet_classes may only name *_EXPOSED classes {list(NUDENET_EXPOSED_LABELS)}; "
                                 f"got {bad}")
            return v

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        return [rows.ID, p.image_column], ["nsfw_score", "nsfw", "nsfw_scores"]

    def __init__(self, model: dict, params: dict):
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, self.device, self.dtype, path = load_spec(model, ("transformers", "nudenet"),
                                                                 "NSFWClassifier")
        self.placeholder = self.resolved.placeholder
        self.backend = self.resolved.spec.backend
        if self.backend == "nudenet":
            self._init_nudenet(path)
        else:
            self._init_transformers(path)

    def _init_transformers(self, path: str) -> None:
        from transformers import pipeline

        p = self.params
        spec = self.resolved.spec
        kwargs = {"revision": spec.revision} if spec.revision else {}
        self.pipe = pipeline("image-classification", model=path, device=self.device, dtype=self.dtype, **kwargs)
        self.labels = list(self.pipe.model.config.id2label.values())
        missing = [lab for lab in (p.unsafe_label, p.safe_label) if lab not in self.labels]
        if missing:
            raise ValueError(f"NSFW model {spec.model!r} has labels {self.labels}, not {missing}; "
                             "set params unsafe_label/safe_label")

    def _init_nudenet(self, path: str) -> None:
        if importlib.util.find_spec("nudenet") is None:
            raise ImportError(NUDENET_MISSING)
        from nudenet import NudeDetector

        onnx = os.path.join(path, self.resolved.file) if self.resolved.file else path
        if not onnx.endswith(".onnx") or not os.path.isfile(onnx):
            raise ValueError(f"nudenet backend needs a local ONNX file (e.g. 'pkg:nudenet/320n.onnx'), got {onnx!r}")
        self.detector = NudeDetector(model_path=onnx, inference_resolution=self.params.nudenet_resolution)

    # -- model calls ---------------------------------------------------------------------

    def _classify(self, images: list) -> list[tuple[float, bool, str]]:
        """transformers: ``batch_size`` images per forward pass -> (nsfw_score, nsfw, scores JSON) each."""
        p = self.params
        out = []
        for res in self.pipe(images, batch_size=p.batch_size, top_k=len(self.labels)):
            scores = {r["label"]: float(r["score"]) for r in res}
            out.append((scores[p.unsafe_label], scores[p.unsafe_label] >= scores[p.safe_label], _dump(scores)))
        return out

    def _detect(self, images: list) -> list[tuple[float, bool, str]]:
        """nudenet: one ONNX run per ``batch_size`` images (BGR arrays, as cv2.imread gives)."""
        p = self.params
        arrays = [np.ascontiguousarray(np.asarray(img)[:, :, ::-1]) for img in images]
        out = []
        for dets in self.detector.detect_batch(arrays, batch_size=p.batch_size):
            score, flag, best = nudenet_verdict(dets, p.nudenet_classes, p.nudenet_threshold)
            out.append((score, flag, _dump(best)))
        return out

    # -- batch ---------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Classify every readable image of the batch (see the class docstring for columns)."""
        p = self.params
        n = batch_len(batch)
        ids = row_ids(batch)
        errors: list[str | None] = [None] * n
        images: dict[int, Any] = {}
        for i, rid in enumerate(ids):
            try:
                images[i] = load_image(batch[p.image_column][i], rid, p.image_column)
            except rows.InputError as exc:
                errors[i] = error_text(exc)
        order = list(images)
        fn = self._detect if self.backend == "nudenet" else self._classify
        results = run_halving_on_oom(fn, [images[i] for i in order])
        score, flag, detail = ([None] * n for _ in range(3))
        for i, res in zip(order, results):
            if isinstance(res, BaseException):
                errors[i] = f"{type(res).__name__}: row {ids[i]!r}: out of memory even alone: {res}"
            else:
                score[i], flag[i], detail[i] = res
        out = dict(batch)
        out["nsfw_score"] = object_column(score)
        out["nsfw"] = object_column(flag)
        out["nsfw_scores"] = object_column(detail)
        out[rows.ROW_ERROR] = object_column(errors)
        return out
