"""Face verdicts shared by MIRROR and MIRROR-LLaVA: face presence, gender and age
preservation, identity similarity (SPEC A1, A8, B5).

Pure functions over the columns ``actors.faces.FaceAnalyzer`` writes; the filter task
functions follow the runtime's contract (``fn(batch, params, audit=False)`` returning the new
columns and ``rows.ROW_REJECT``, see ``jobs.core.runtime``).

Sources of the rules:

- exactly one face: MIRROR step 1 (``face_annot.py``) and step 4 (``attr.py``) drop images on
  which DeepFace finds no face; the generated images must show the client alone (SPEC A8);
- gender preserved: generated ``dominant_gender`` equals the source's (MIRROR
  ``filter_generated_image.ipynb``, SPEC A8);
- age preserved: ``|age_src - age_gen| <= 10`` years (same notebook; over 390,491 images
  mean 6.33, median 5, p75 9);
- identity: cosine similarity of the source and generated face embeddings; MIRROR drops
  images below **0.2** (dataset filter, ``step4/identity.py``) and MIRROR-LLaVA's inference
  check asks for **0.3** (SPEC B5); both are DeepFace VGG-Face cosines. For the dlib 128-d
  embedding the threshold is our own measurement on the real pairs of
  ``../shared/data/faces/pairs.csv`` (see ``IDENTITY_THRESHOLDS``).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from udfs import rows

__all__ = ["GENDERS", "EMOTIONS", "IDENTITY_THRESHOLDS", "cosine_similarity", "identity_threshold",
           "face_verdict", "FacePresenceParams", "face_presence_filter", "PreservationParams",
           "PRESERVATION_CHECKS", "preservation_checks", "enabled_preservation_checks", "preservation_failures",
           "preservation_reason", "preservation_filter"]

#: DeepFace's spelling of the two gender classes (``dominant_gender``).
GENDERS = ("Woman", "Man")
#: The preservation checks, in the order they run (``preservation_checks``).
PRESERVATION_CHECKS = ("gender", "age", "identity")
#: FER2013 / DeepFace emotion classes, in the models' output order.
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: Minimum identity cosine similarity per embedding backend and use.
#: ``deepface:VGG-Face``: MIRROR dataset filter 0.2 (``mirror/step4/identity.py`` + notebook),
#: MIRROR-LLaVA inference check 0.3 (SPEC B5). ``dlib``: measured by ``benchmarks/faces.py`` on
#: the 41 same / 779 different real pairs of ``../shared/data/faces/pairs.csv`` (dlib 128-d
#: ResNet, HOG detection). dlib descriptors are not centred, so every cosine is high: same
#: person 0.932-0.998, different people 0.712-0.918 (ROC AUC 1.0); 0.925 is the middle of the
#: gap and serves both uses (the originals' 0.2/0.3 would accept everyone under dlib).
IDENTITY_THRESHOLDS: dict[str, dict[str, float]] = {
    "deepface:VGG-Face": {"mirror_dataset": 0.2, "mirror_llava_inference": 0.3},
    "dlib": {"mirror_dataset": 0.925, "mirror_llava_inference": 0.925},
}


def cosine_similarity(a: Any, b: Any) -> float:
    """Cosine of two embeddings (sequences of floats of equal length), in -1..1.

    Raises ``ValueError`` when the lengths differ or either vector is all zeros.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"embedding lengths differ: {x.size} vs {y.size}")
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        raise ValueError("cannot take the cosine of an all-zero embedding")
    return float(x @ y / (nx * ny))


def identity_threshold(face_backend: str, use: str) -> float:
    """The identity threshold for an embedding backend (``FaceAnalyzer``'s ``face_backend``
    prefix: ``dlib`` or ``deepface:<model>``) and a use (``mirror_dataset`` or
    ``mirror_llava_inference``). Raises ``KeyError`` naming the known keys."""
    key = "dlib" if face_backend.startswith("dlib") else face_backend.split("|")[0]
    if key not in IDENTITY_THRESHOLDS or use not in IDENTITY_THRESHOLDS[key]:
        raise KeyError(f"no identity threshold for backend {key!r} and use {use!r}; known: "
                       f"{ {k: sorted(v) for k, v in IDENTITY_THRESHOLDS.items()} }")
    return IDENTITY_THRESHOLDS[key][use]


def face_verdict(face_count: Any) -> str | None:
    """``None`` when exactly one face was found, else the rejection reason
    (``no face found`` / ``2 faces found, expected exactly one``)."""
    n = int(face_count or 0)
    if n == 1:
        return None
    return "no face found" if n == 0 else f"{n} faces found, expected exactly one"


class FacePresenceParams(BaseModel):
    """Params of ``face_presence_filter`` (none: the rule is fixed)."""

    model_config = ConfigDict(extra="forbid")


def face_presence_filter(batch: dict, params: Any, audit: bool = False) -> dict:
    """Reject rows whose ``face_count`` is not exactly 1 (MIRROR steps 1 and 4). The runtime
    records the verdict in ``_audit`` instead when the stage runs in audit mode."""
    return {rows.ROW_REJECT: [face_verdict(c) for c in batch["face_count"]]}


class PreservationParams(BaseModel):
    """Params of ``preservation_filter``: compare a generated face with its source face."""

    model_config = ConfigDict(extra="forbid")

    source_prefix: str = Field("source_", description="Prefix of the source face's columns "
                               "(``source_gender``, ``source_age``, ``source_identity_embedding``).")
    check_gender: bool = Field(True, description="Generated gender must equal the source's (MIRROR).")
    max_age_gap: float | None = Field(10.0, ge=0, description="Largest |age_src - age_gen| in years "
                                      "(MIRROR notebook: 10); None disables the check.")
    identity_use: Literal["mirror_dataset", "mirror_llava_inference"] | None = Field(
        "mirror_dataset", description="Which identity threshold of IDENTITY_THRESHOLDS applies; None "
        "disables the check.")
    min_identity: float | None = Field(None, description="Explicit identity threshold overriding "
                                       "identity_use's.")


def preservation_checks(gen: dict, src: dict, p: PreservationParams) -> tuple[list[tuple[str, str]], float | None]:
    """Every failed check as ``(check, message)`` with ``check`` one of ``PRESERVATION_CHECKS``
    (``gender``, ``age``, ``identity``; empty list: the face is preserved), and the identity
    cosine (None when the check is off or an embedding is missing), for one generated face
    ``gen`` and its source ``src`` (dicts with ``gender``, ``age``, ``identity_embedding``;
    ``gen`` also has ``face_backend``). Callers decide from the check names, never from the
    message text. Raises ``ValueError`` when the two embeddings differ in length (they come
    from different face backends)."""
    fails: list[tuple[str, str]] = []
    sim = None
    if p.check_gender and gen.get("gender") != src.get("gender"):
        fails.append(("gender", f"gender changed: source {src.get('gender')}, generated {gen.get('gender')}"))
    if p.max_age_gap is not None:
        if _missing(gen.get("age")) or _missing(src.get("age")):
            fails.append(("age", "age: no age estimate for the generated or the source image"))
        else:
            gap = abs(float(gen["age"]) - float(src["age"]))
            if gap > p.max_age_gap:
                fails.append(("age", f"age changed by {gap:.1f} years (source {float(src['age']):.0f}, "
                                     f"generated {float(gen['age']):.0f}; max {p.max_age_gap:g})"))
    if p.identity_use is not None or p.min_identity is not None:
        if _missing(gen.get("identity_embedding")) or _missing(src.get("identity_embedding")):
            fails.append(("identity", "identity: no face embedding for the generated or the source image"))
        else:
            sim = cosine_similarity(gen["identity_embedding"], src["identity_embedding"])
            threshold = p.min_identity if p.min_identity is not None else identity_threshold(
                str(gen.get("face_backend") or ""), p.identity_use)
            if sim < threshold:
                fails.append(("identity", f"identity similarity {sim:.3f} < {threshold:g}"))
    return fails, sim


def enabled_preservation_checks(p: PreservationParams) -> list[str]:
    """The checks of ``PRESERVATION_CHECKS`` that ``p`` turns on, in order."""
    on = {"gender": p.check_gender, "age": p.max_age_gap is not None,
          "identity": p.identity_use is not None or p.min_identity is not None}
    return [c for c in PRESERVATION_CHECKS if on[c]]


def preservation_failures(gen: dict, src: dict, p: PreservationParams) -> tuple[list[str], float | None]:
    """``preservation_checks`` with the messages only: ``["gender changed: ...", "age ...",
    "identity ..."]`` (empty: the face is preserved) and the identity cosine."""
    fails, sim = preservation_checks(gen, src, p)
    return [m for _, m in fails], sim


def preservation_reason(gen: dict, src: dict, p: PreservationParams) -> tuple[str | None, float | None]:
    """``(first failure of preservation_failures or None, identity cosine or None)``: gender is
    checked first, then the age gap, then identity."""
    fails, sim = preservation_failures(gen, src, p)
    return (fails[0] if fails else None), sim


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and bool(np.isnan(v)))


def preservation_filter(batch: dict, params: PreservationParams, audit: bool = False) -> dict:
    """Reject generated faces whose gender, age or identity drifted from the source face.

    Reads ``gender``, ``age``, ``identity_embedding``, ``face_backend`` and the first three
    again with ``params.source_prefix``; outputs ``identity_similarity`` (float, or None when
    the check is off or an embedding is missing) and the verdicts.
    """
    keys = ("gender", "age", "identity_embedding", "face_backend")
    n = len(batch[rows.ID])
    reasons, sims = [], []
    for i in range(n):
        gen = {k: batch[k][i] for k in keys}
        src = {k: batch[params.source_prefix + k][i] for k in keys[:3]}
        reason, sim = preservation_reason(gen, src, params)
        reasons.append(reason)
        sims.append(sim)
    return {"identity_similarity": sims, rows.ROW_REJECT: reasons}
