"""MIRROR step 3 and the image half of step 4: expression-description prompts, image prompts,
and the per-image filter verdicts (SPEC A4, A6, A8).

Prompts are our own wording of SPEC A4/A6's descriptions. Rules and thresholds:

- one row per client utterance; history = every earlier utterance as
  ``Speaker: [direction] statement`` (SPEC A4);
- the LLM returns an **aligned** expression description (what the client's face shows while
  saying the utterance) and a **contrasting** one (an expression that does not fit), SPEC A4;
- image prompt = "portrait photo of a man|woman img" (PhotoMaker trigger word ``img``) +
  realism tags + the aligned description; negative prompt = a standard list of negatives +
  the contrasting description (SPEC A6); the gender is the source identity's (DeepFace
  ``dominant_gender``, SPEC A6);
- CLIP text "A facial photo with {stage direction lower-cased}", ViT-B/32 cosine < 0.2
  drops (SPEC A8, ``mirror/step4/clip.py``);
- an image fails when it does not show exactly one face, the gender or age (|Δ| > 10 years)
  or identity (cosine below the backend's threshold) drifted from the source face
  (``udfs.faces``), the CLIP cosine is below the threshold, or the NSFW classifier flags it
  (Falconsai rule ``nsfw >= normal``, ``actors.nsfw``). ``image_filters`` checks all of them
  at once, so a rejected image's reason names every failing filter (SPEC A8: the notebooks
  record each drop type).
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from udfs import faces as F
from udfs import rows as R

__all__ = ["ExpressionReply", "MAX_EXPRESSION_CHARS", "expression_messages", "image_prompt", "IMAGE_NEGATIVES",
           "REALISM_TAGS", "clip_text", "ImageFilterParams", "IMAGE_FILTERS", "enabled_image_filters",
           "image_checks", "image_verdicts", "image_filters"]

#: Realism tags added after the subject (SPEC A6 "realism quality tags"; our wording).
REALISM_TAGS = "photorealistic, natural skin texture, soft studio lighting, sharp focus, high detail"
#: Standard negatives (SPEC A6: a ~20-tag SD negative list; our selection of the usual tags).
IMAGE_NEGATIVES = ("nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                   "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
                   "signature, watermark, username, blurry, grayscale, deformed face")

_EXPRESSION_SYSTEM = """\
You annotate counselling transcripts for a study of facial expressions. You read the
conversation so far and the client's newest line, including the stage direction in square
brackets. Reply with JSON only, with two short descriptions (under 20 words each):
"aligned": the client's visible facial expression while saying the newest line;
"contrasting": a facial expression that would clearly not fit that line."""

_EXAMPLE_USER = """\
Conversation so far:
Therapist: [warmly] How have things been with your new puppy?
Newest client line:
Client: [doubtful] I guess training is going fine, but I am not sure it is working."""

_EXAMPLE_REPLY = ('{"aligned": "unsure look with raised eyebrows and lips pressed together", '
                  '"contrasting": "bright open smile with relaxed eyes"}')


#: Longest expression description, characters (the prompt asks for under 20 words; about 50
#: words fit). Bounds the reply for constrained decoding and the image prompt.
MAX_EXPRESSION_CHARS = 300


def _one_line_description(value: str) -> str:
    """Whitespace runs (newlines included) collapsed to one space; raises ``ValueError`` for a
    description without a letter (any script) or with other control characters."""
    text = " ".join(str(value).split())
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise ValueError("contains control characters")
    if not any(c.isalpha() for c in text):
        raise ValueError("must describe an expression in words (no letter found)")
    return text


class ExpressionReply(BaseModel):
    """Schema of the expression-description reply (SPEC A4's two labelled lines, as JSON).

    The schema constrains only what matters: two non-empty descriptions of at most
    ``MAX_EXPRESSION_CHARS`` characters each (no character pattern: digits, punctuation and
    non-ASCII text are normal in a description; issue 18 item 3). The validator then
    collapses whitespace to one line and rejects text without a letter or with control
    characters (constrained decoders let raw control bytes into strings: notes §4)."""

    model_config = ConfigDict(extra="forbid")

    aligned: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                         description="Facial expression matching the client's line.")
    contrasting: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                             description="Facial expression that does not match it.")

    @field_validator("aligned", "contrasting")
    @classmethod
    def _clean(cls, v: str) -> str:
        return _one_line_description(v)


def _line(turn: dict[str, Any]) -> str:
    direction = turn.get("stage_direction") or ""
    return f"{turn.get('speaker')}: [{direction}] {turn.get('statement') or ''}".replace("[] ", "")


def expression_messages(history: list[dict[str, Any]], turn: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages asking for the aligned and contrasting expression of ``turn`` (a client
    turn ``{speaker, stage_direction, statement}``) after ``history`` (earlier turns); one
    worked example first (SPEC A4's one-shot, our own example)."""
    past = "\n".join(_line(t) for t in history) or "(the session has just started)"
    user = f"Conversation so far:\n{past}\nNewest client line:\n{_line(turn)}"
    return [{"role": "system", "content": _EXPRESSION_SYSTEM},
            {"role": "user", "content": _EXAMPLE_USER}, {"role": "assistant", "content": _EXAMPLE_REPLY},
            {"role": "user", "content": user}]


def image_prompt(gender: str | None, aligned: str, contrasting: str, trigger: str = "img") -> tuple[str, str]:
    """``(prompt, negative_prompt)`` of one client image (SPEC A6). ``gender``: ``Man`` or
    ``Woman`` (the source identity's); anything else gives "person". ``trigger``: PhotoMaker's
    trigger word after the class word ("" for methods without one)."""
    noun = {"Man": "man", "Woman": "woman"}.get(str(gender), "person")
    subject = f"portrait photo of a {noun} {trigger}".strip()
    return f"{subject}, {REALISM_TAGS}, {aligned}", f"{IMAGE_NEGATIVES}, {contrasting}"


def clip_text(stage_direction: str | None) -> str:
    """CLIP caption of a client image: "A facial photo with {direction lower-cased}" (SPEC A8)."""
    return f"A facial photo with {(stage_direction or '').strip().lower()}"


class ImageFilterParams(BaseModel):
    """Thresholds of ``image_filters`` (sources in the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    preservation: F.PreservationParams = Field(default_factory=F.PreservationParams,
                                               description="Gender/age/identity rules (udfs.faces).")
    min_clip: float = Field(0.2, description="Lowest CLIP cosine of image and 'A facial photo with "
                            "{direction}' (MIRROR step4/clip.py: 0.2, ViT-B/32).")
    check_nsfw: bool = Field(True, description="Drop images the NSFW classifier flags (MIRROR step4/nsfw.py).")


#: The image filters, in the order they run and are reported (``image_checks``).
IMAGE_FILTERS = ("face", *F.PRESERVATION_CHECKS, "clip", "nsfw")


def enabled_image_filters(p: ImageFilterParams) -> list[str]:
    """The filters of ``IMAGE_FILTERS`` that ``p`` turns on, in order (``face`` and ``clip``
    always run; gender, age and identity as ``p.preservation`` says; ``nsfw`` when
    ``p.check_nsfw``)."""
    on = {"face", "clip", *F.enabled_preservation_checks(p.preservation), *(["nsfw"] if p.check_nsfw else [])}
    return [f for f in IMAGE_FILTERS if f in on]


def image_checks(row: dict[str, Any], p: ImageFilterParams) -> tuple[list[tuple[str, str]], float | None]:
    """Every failing image filter of one row as ``(filter, message)``, ``filter`` one of
    ``IMAGE_FILTERS`` (empty list: the image passes), and the identity cosine. ``row`` holds
    the ``FaceAnalyzer`` columns of the generated image, the source face columns
    (``source_*``), ``clip_scores`` and ``nsfw``. Verdicts are read from the filter names,
    never from the messages. Raises ``ValueError`` when the generated and source embeddings
    differ in length (``udfs.faces.cosine_similarity``)."""
    fails: list[tuple[str, str]] = []
    sim = None
    presence = F.face_verdict(row.get("face_count"))
    if presence:
        fails.append(("face", f"face: {presence}"))
    else:
        pp = p.preservation
        src = {k: row.get(pp.source_prefix + k) for k in ("gender", "age", "identity_embedding")}
        kept, sim = F.preservation_checks(row, src, pp)
        fails += kept
    scores = row.get("clip_scores")
    clip = float(scores[0]) if scores is not None and len(scores) else None
    if clip is None or clip < p.min_clip:
        fails.append(("clip", f"clip: image-text cosine {'none' if clip is None else f'{clip:.3f}'} < {p.min_clip:g}"))
    if p.check_nsfw and bool(row.get("nsfw")):
        fails.append(("nsfw", f"nsfw: flagged (score {float(row.get('nsfw_score') or 0):.3f})"))
    return fails, sim


def image_verdicts(row: dict[str, Any], p: ImageFilterParams) -> tuple[list[str], float | None]:
    """``image_checks`` with the messages only (``"<filter>: <reason>"``; empty: the image
    passes) and the identity cosine."""
    fails, sim = image_checks(row, p)
    return [m for _, m in fails], sim


def image_filters(batch: dict, params: ImageFilterParams, audit: bool = False) -> dict:
    """Filter stage over generated client images: outputs ``identity_similarity``,
    ``clip_score``, ``image_failures`` (JSON list of ``{"filter": <IMAGE_FILTERS name>,
    "detail": <message>}``) and ``rows.ROW_REJECT`` (all messages joined with "; ")."""
    n = len(batch[R.ID])
    sims, clips, failures, reasons = [], [], [], []
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        fails, sim = image_checks(row, params)
        scores = row.get("clip_scores")
        clips.append(float(scores[0]) if scores is not None and len(scores) else None)
        sims.append(sim)
        failures.append(json.dumps([{"filter": f, "detail": m} for f, m in fails]))
        reasons.append("; ".join(m for _, m in fails) or None)
    return {"identity_similarity": sims, "clip_score": clips, "image_failures": failures, R.ROW_REJECT: reasons}
