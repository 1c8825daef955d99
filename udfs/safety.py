"""Dialogue-safety and NSFW rules (pure functions; no Ray, no model): label sets, the
dialogue cell format, NudeNet's verdict, and the two filter task functions.

Sources of the labels and rules:

- Canary labels: ProsocialDialog (Kim et al., EMNLP 2022, arXiv 2205.12688), the Canary
  safety model's five safety classes ``__casual__``, ``__possibly_needs_caution__``,
  ``__probably_needs_caution__``, ``__needs_caution__``, ``__needs_intervention__``
  (its output is the label, optionally followed by a rule of thumb).
- MIRROR's dialogue rule (SPEC A8 "Dialogue safety"; ``mirror@3bc4a9a: mirror/step4/safety.py``
  and ``filter_generated_dialogue.ipynb``): drop the dialogue when a **therapist** utterance
  is ``__needs_caution__`` or ``__needs_intervention__`` (452 of 41,223 dialogues). The
  original scored the client statements twice and zipped the second result onto the
  therapist turns (SPEC A10.6); here each utterance is scored once, as itself, and the
  rule reads the speaker of that utterance.
- NSFW: MIRROR ``step4/nsfw.py`` with ``Falconsai/nsfw_image_detection`` drops an image when
  ``score['nsfw'] >= score['normal']`` (SPEC A8 "NSFW"; the model card's labels ``normal``
  and ``nsfw``). The verdict is computed by ``actors.nsfw.NSFWClassifier``; the filter
  here only applies it.
- NudeNet (optional extra, ``nudenet==3.4.2``): class names from ``nudenet/nudenet.py``
  (``__labels``); see ``nudenet_verdict`` for the classes and threshold used.

Filter functions follow the runtime's contract (``jobs.core.runtime.Stage`` with ``filter=True``
and ``params_model``): ``fn(batch, params, audit=False) -> dict`` of their declared output
columns plus ``rows.ROW_REJECT`` (``None`` or the reason, per row). In audit mode (the
runtime sets it when the evidence comes from a placeholder model, or the recipe says
``audit: true``) the verdicts are computed identically and the runtime records them in
``_audit`` instead of rejecting.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from udfs import rows as R

__all__ = ["CANARY_LABELS", "MIRROR_DROP_LABELS", "MIRROR_SPEAKERS", "NUDENET_EXPOSED_LABELS",
           "NUDENET_DEFAULT_CLASSES", "dialogue_utterances", "speaker_selected", "SafetyFilterParams",
           "safety_flags", "safety_filter", "nsfw_filter", "nudenet_verdict"]

#: Canary's five safety labels, least to most severe (ProsocialDialog, arXiv 2205.12688).
CANARY_LABELS: tuple[str, ...] = ("__casual__", "__possibly_needs_caution__", "__probably_needs_caution__",
                                  "__needs_caution__", "__needs_intervention__")
#: labels that drop a MIRROR dialogue (SPEC A8, mirror filter_generated_dialogue.ipynb).
MIRROR_DROP_LABELS: tuple[str, ...] = ("__needs_caution__", "__needs_intervention__")
#: speakers whose utterances MIRROR's rule checks (SPEC A8: therapist turns only).
MIRROR_SPEAKERS: tuple[str, ...] = ("therapist",)

#: every ``*_EXPOSED`` class of NudeNet 3.4.2's detector (``nudenet/nudenet.py`` ``__labels``).
NUDENET_EXPOSED_LABELS: tuple[str, ...] = (
    "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED", "FEET_EXPOSED", "ARMPITS_EXPOSED", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED")
#: the exposed classes that flag an image by default: explicit nudity only. Our choice (NudeNet
#: publishes no NSFW rule): exposed feet, armpits, belly and male chest are ordinary in
#: safe-for-work photos; add them in the recipe if a use needs them.
NUDENET_DEFAULT_CLASSES: tuple[str, ...] = ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
                                            "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED")


# ----------------------------------------------------------------------------- dialogue cells

def dialogue_utterances(value: Any, row_id: str, field: str, speaker_key: str = "speaker",
                        text_key: str = "statement") -> list[tuple[str, str]]:
    """A dialogue cell as ``[(speaker, statement), ...]`` in dialogue order.

    The cell is a list of utterance records, each a mapping with at least ``speaker_key``
    and ``text_key`` (MIRROR's parsed screenplay lines ``{speaker, stage_direction,
    statement, t}`` fit as they are; other keys are ignored). Accepted containers: a
    list/tuple, a numpy object array (Ray Data's numpy batches), or a JSON string of such a
    list (CSV input). ``None`` or an empty list is a dialogue without utterances (``[]``).

    Raises:
        rows.InputError: the cell is not a list of mappings, or an utterance lacks its
            speaker or its statement (null), or one is not a string; the message names the
            row, the field and the utterance index (0-based).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise R.InputError(row_id, field, f"malformed JSON dialogue {value[:80]!r}: {exc}") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise R.InputError(row_id, field, f"expected a list of utterances, got {type(value).__name__}")
    out = []
    for j, utt in enumerate(value):
        if not isinstance(utt, dict):
            raise R.InputError(row_id, field, f"utterance {j} is a {type(utt).__name__}, expected a mapping "
                                              f"with {speaker_key!r} and {text_key!r}")
        speaker, text = utt.get(speaker_key), utt.get(text_key)
        for key, v in ((speaker_key, speaker), (text_key, text)):
            if v is None:
                raise R.InputError(row_id, field, f"utterance {j} has no {key!r}")
            if not isinstance(v, str):
                raise R.InputError(row_id, field, f"utterance {j} {key!r} is a {type(v).__name__}, not a string")
        out.append((speaker, text))
    return out


def speaker_selected(speaker: str | None, speakers: Sequence[str] | None) -> bool:
    """True when ``speakers`` is ``None`` (every speaker counts) or holds ``speaker``,
    compared case-insensitively after stripping (MIRROR writes ``Therapist:``)."""
    if speakers is None:
        return True
    return speaker is not None and speaker.strip().casefold() in {s.strip().casefold() for s in speakers}


# ----------------------------------------------------------------------------- dialogue safety rule

class SafetyFilterParams(BaseModel):
    """Recipe fields of the dialogue-safety filter. Defaults are MIRROR's rule (SPEC A8)."""

    model_config = ConfigDict(extra="forbid")

    speakers: list[str] | None = Field(list(MIRROR_SPEAKERS), description="Speakers whose utterances count "
                                       "(case-insensitive); null = every speaker. MIRROR: therapist only.")
    drop_labels: list[str] = Field(list(MIRROR_DROP_LABELS), min_length=1, description="Canary labels that "
                                   "drop the dialogue when a counted utterance has one. MIRROR: "
                                   "__needs_caution__ and __needs_intervention__.")

    @field_validator("drop_labels")
    @classmethod
    def _known_labels(cls, v: list[str]) -> list[str]:
        unknown = [label for label in v if label not in CANARY_LABELS]
        if unknown:
            raise ValueError(f"unknown Canary labels {unknown}; known: {list(CANARY_LABELS)}")
        return v


def safety_flags(labels: Sequence[str | None], speakers: Sequence[str | None],
                 params: SafetyFilterParams) -> list[tuple[int, str, str]]:
    """The utterances that break the rule, as ``(index, speaker, label)`` in dialogue order.

    ``labels[j]``/``speakers[j]`` belong to utterance ``j`` (a ``None`` label is an utterance
    the classifier skipped: it never counts). Raises ``ValueError`` when the lists differ in
    length.
    """
    if len(labels) != len(speakers):
        raise ValueError(f"{len(labels)} safety labels for {len(speakers)} speakers")
    drop = set(params.drop_labels)
    return [(j, s, lab) for j, (lab, s) in enumerate(zip(labels, speakers))
            if lab in drop and speaker_selected(s, params.speakers)]


def safety_filter(batch: dict, params: SafetyFilterParams, audit: bool = False) -> dict:
    """Drop dialogues with an utterance that breaks the safety rule (MIRROR: a therapist line
    labelled ``__needs_caution__`` or ``__needs_intervention__``).

    Inputs ``safety_labels`` and ``safety_speakers`` (per row, lists aligned with the
    dialogue's utterances, as ``actors.safety.DialogueSafetyClassifier`` writes them).
    Output ``safety_flagged`` (list[int]: indices of the utterances that break the rule,
    empty when none) and ``rows.ROW_REJECT``: ``"safety: utterance 3 (Therapist) is
    __needs_intervention__; ..."``. ``audit`` does not change the verdicts (the runtime
    records them instead of applying them).
    """
    params = params if isinstance(params, SafetyFilterParams) else SafetyFilterParams.model_validate(params or {})
    flagged, reject = [], []
    for labels, speakers in zip(batch["safety_labels"], batch["safety_speakers"]):
        hits = safety_flags(list(labels if labels is not None else []),
                            list(speakers if speakers is not None else []), params)
        flagged.append([j for j, _, _ in hits])
        reject.append("safety: " + "; ".join(f"utterance {j} ({s}) is {lab}" for j, s, lab in hits)
                      if hits else None)
    return {"safety_flagged": flagged, R.ROW_REJECT: reject}


# ----------------------------------------------------------------------------- NSFW

def nsfw_filter(batch: dict, params: Any = None, audit: bool = False) -> dict:
    """Drop rows whose image the NSFW classifier flagged (column ``nsfw``, with ``nsfw_score``).

    A cell may hold one verdict (one image per row: ``bool`` and ``float``) or a list of
    verdicts (a dialogue's images gathered into one row: ``list[bool]`` and ``list[float]``);
    MIRROR drops the dialogue when any of its images is flagged (SPEC A8). Output
    ``nsfw_flagged`` (list[int]: flagged image indices; ``[0]`` or ``[]`` for a single
    image) and ``rows.ROW_REJECT``: ``"nsfw: image flagged (nsfw_score 0.731)"`` or
    ``"nsfw: images 0, 3 flagged (nsfw_score 0.731, 0.912)"``. The rule itself (Falconsai's
    ``nsfw >= normal``, or NudeNet's exposed classes) was applied by the classifier.
    """
    flagged, reject = [], []
    for flags, scores in zip(batch["nsfw"], batch["nsfw_score"]):
        many = isinstance(flags, (list, tuple, np.ndarray))
        flags = list(flags) if many else [flags]
        scores = list(scores) if isinstance(scores, (list, tuple, np.ndarray)) else [scores]
        hits = [j for j, f in enumerate(flags) if f]
        flagged.append(hits)
        if not hits:
            reject.append(None)
            continue
        shown = ", ".join(f"{scores[j]:.3f}" if j < len(scores) and scores[j] is not None else "?" for j in hits)
        where = f"images {', '.join(map(str, hits))}" if many else "image"
        reject.append(f"nsfw: {where} flagged (nsfw_score {shown})")
    return {"nsfw_flagged": flagged, R.ROW_REJECT: reject}


def nudenet_verdict(detections: Sequence[dict], classes: Sequence[str],
                    threshold: float) -> tuple[float, bool, dict[str, float]]:
    """NudeNet detections of one image -> ``(nsfw_score, nsfw, class_scores)``.

    Only detections whose ``class`` is in ``classes`` count (``*_EXPOSED`` classes; the
    face labels ``FACE_FEMALE``/``FACE_MALE`` and every ``*_COVERED`` class are ignored):
    ``nsfw_score`` is the highest such detection score (0..1, ``0.0`` when none),
    ``nsfw`` is ``nsfw_score >= threshold``, ``class_scores`` maps each counted class found
    to its highest score. ``detections`` are NudeNet's ``{"class", "score", "box"}`` dicts;
    NudeNet itself returns boxes from score 0.25 up (``cv2.dnn.NMSBoxes(..., 0.25, 0.45)``
    in ``nudenet/nudenet.py``), so thresholds below 0.25 behave like 0.25.
    """
    wanted = set(classes)
    best: dict[str, float] = {}
    for d in detections:
        cls = d.get("class")
        if cls in wanted:
            best[cls] = max(best.get(cls, 0.0), float(d.get("score", 0.0)))
    score = max(best.values(), default=0.0)
    return score, bool(best) and score >= threshold, best
