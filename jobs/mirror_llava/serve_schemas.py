"""Request and response models of the MIRROR-LLaVA Serve application (typed HTTP bodies and
handle arguments; images as base64 in JSON, bytes from Python handles)."""
from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema,
                      field_validator)


def decode_image(value: Any) -> bytes:
    """Request image -> encoded bytes, after checking that PIL decodes it.

    Accepts bytes (handle callers), a base64 string or a ``data:<mime>;base64,`` URL. Raises
    ``ValueError`` (pydantic turns it into 422) for another type, invalid base64, empty data or
    an undecodable / truncated / decompression-bomb image."""
    from udfs.images import load_image
    from udfs.rows import InputError

    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or not head.endswith(";base64"):
                raise ValueError("data URL must be 'data:<mime>;base64,<payload>'")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image is not valid base64") from None
    else:
        raise ValueError(f"image must be a base64 string, got {type(value).__name__}")
    if not data:
        raise ValueError("image is empty")
    try:
        load_image(data, "request", "image")
    except InputError as exc:
        raise ValueError(exc.problem) from None
    return data


#: An image field: base64 string / data URL in JSON, bytes from Python handles; validated by decoding.
ImageData = Annotated[bytes, PlainValidator(decode_image),
                      PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
                      WithJsonSchema({"type": "string", "format": "byte",
                                      "description": "base64-encoded image (PNG, JPEG, GIF, WebP) or a data: URL"})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingOverride(_Strict):
    """Per-request sampling values over the role's recipe params (OpenAI semantics; ranges
    checked by ``actors.llm_base.Sampling``: temperature 0..2, top_p (0, 1], max_tokens >= 1,
    penalties -2..2)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None


class Turn(_Strict):
    """One utterance: ``Speaker: [stage direction] statement`` (SPEC A4's history line)."""

    speaker: str = Field(min_length=1, max_length=40, description="Therapist or Client (any name is kept).")
    stage_direction: str | None = Field(None, max_length=200, description="Non-verbal cue in square brackets.")
    statement: str = Field("", max_length=4000, description="What is said (may be empty for a non-verbal turn).")


_SPEAKER_LINE = re.compile(r"^([A-Za-z][\w .'-]{0,39}):\s*(.*)$")
_DIRECTION = re.compile(r"^\[(.*?)\]\s*(.*)$", re.S)


def parse_turn(line: str, default_speaker: str | None = None) -> Turn:
    """``"Client: [sighs] I guess"`` -> ``Turn``. A line without a ``Speaker:`` prefix gets
    ``default_speaker``; raises ``ValueError`` when there is none."""
    from udfs.mirror_screenplay import parse_line

    s = line.strip()
    parsed = parse_line(s)
    if parsed is not None:
        return Turn(**parsed)
    m = _SPEAKER_LINE.match(s)
    speaker, rest = (m.group(1), m.group(2)) if m else (default_speaker, s)
    if speaker is None:
        raise ValueError(f"line {s[:80]!r} is not 'Speaker: [direction] statement'")
    d = _DIRECTION.match(rest)
    if d:
        return Turn(speaker=speaker, stage_direction=d.group(1).strip() or None, statement=d.group(2).strip())
    return Turn(speaker=speaker, statement=rest.strip())


def parse_history(text: str) -> list[Turn]:
    """Form-field history (one ``Speaker: [direction] statement`` per line, blank lines
    skipped) -> turns. Raises ``ValueError`` naming the first line without a speaker."""
    return [parse_turn(line) for line in text.splitlines() if line.strip()]


class DescribeRequest(_Strict):
    """History + the client's newest utterance -> expression descriptions (SPEC A4/B5)."""

    history: list[Turn] | str = Field(default_factory=list, description="Earlier turns, as objects or as text "
                                      "lines 'Speaker: [direction] statement'.")
    utterance: Turn | str = Field(description="The client's newest line ('Client: [direction] statement', or "
                                  "just the statement: speaker Client).")
    gender: Literal["Man", "Woman"] | None = Field(None, description="Source identity's gender (DeepFace "
                                                   "spelling): also return the image prompt (SPEC A6).")
    sampling: SamplingOverride | None = None

    @field_validator("history", mode="after")
    @classmethod
    def _history(cls, v):
        return parse_history(v) if isinstance(v, str) else v

    @field_validator("utterance", mode="after")
    @classmethod
    def _utterance(cls, v):
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("utterance is empty")
            return parse_turn(v, default_speaker="Client")
        return v


class _ModelInfo(BaseModel):
    model: str = Field(description="Model spec's model (hub id, path, pkg: or placeholder:).")
    placeholder: bool = Field(description="True when the model is a tiny random-init placeholder: the output "
                              "is meaningless.")


class DescribeResponse(_ModelInfo):
    aligned: str = Field(description="Facial expression that matches the utterance (udfs.mirror_images."
                         "ExpressionReply, 3-120 chars).")
    contrasting: str = Field(description="Facial expression that does not match it.")
    response: str = Field(description="The original's two labelled lines (SPEC A4).")
    prompt: str | None = Field(None, description="Image prompt (with gender): 'portrait photo of a <man|woman> "
                               "<trigger>, <realism tags>, <aligned>' (SPEC A6).")
    negative_prompt: str | None = Field(None, description="Standard negatives + the contrasting description.")
    clip_text: str = Field(description="CLIP caption the verifier uses: 'A facial photo with <direction>'.")
    prompt_tokens: int
    completion_tokens: int
    attempts: int = Field(description="LLM calls (1 + repairs of replies that failed the schema).")


class GenerateRequest(_Strict):
    """Source face + prompts + seed -> one identity-preserving face image (SPEC A7, B3 step 2)."""

    source_image: ImageData
    prompt: str = Field(min_length=1, max_length=2000, description="PhotoMaker: must contain '<class word> "
                        "<trigger>' once, e.g. 'portrait photo of a woman img, ...'.")
    negative_prompt: str = Field("", max_length=2000)
    seed: int | None = Field(None, ge=0, lt=2**63, description="None: derived from a hash of the inputs.")


class GenerateResponse(_ModelInfo):
    image_png_b64: str = Field(description="PNG (RGB, output_size x output_size px), base64.")
    seed: int
    width: int
    height: int
    identity_method: str = Field(description="photomaker or ip_adapter.")
    steps: int


class VerifyRequest(_Strict):
    """Generated image + source face + stage direction -> the three checks of SPEC B5."""

    image: ImageData
    source_image: ImageData
    stage_direction: str = Field(min_length=1, max_length=200, description="Client's stage direction (CLIP "
                                 "text 'A facial photo with <direction lower-cased>').")
    image_placeholder: bool = Field(False, description="The image came from a placeholder generator (puts the "
                                    "verification in audit mode when audit is automatic).")


class NSFWCheck(BaseModel):
    enabled: bool
    passed: bool | None = Field(description="Not flagged (None: check off).")
    score: float | None = Field(description="p(nsfw) (transformers) or best *_EXPOSED score (nudenet).")
    flagged: bool | None
    scores: dict[str, float] = Field(default_factory=dict, description="Every label's probability.")
    rule: str = "flagged when p(nsfw) >= p(normal) (MIRROR-LLaVA verify.py, Falconsai)"
    model: str
    placeholder: bool


class CLIPCheck(BaseModel):
    passed: bool
    score: float | None = Field(description="Cosine of the L2-normalised image and text embeddings, -1..1.")
    threshold: float = Field(description="Lowest passing cosine (SPEC B5: 0.2, ViT-B/32).")
    text: str
    model: str
    placeholder: bool


class IdentityCheck(BaseModel):
    enabled: bool
    passed: bool | None = Field(description="Exactly one face and cosine >= threshold (None: check off).")
    similarity: float | None = Field(description="Cosine of the source and generated face embeddings.")
    threshold: float | None = Field(description="udfs.faces.IDENTITY_THRESHOLDS[backend][use] (VGG-Face 0.3, "
                                    "dlib 0.925) or preservation.min_identity.")
    backend: str = Field(description="dlib or deepface:<model>.")
    use: str | None
    face_count: int | None = Field(description="Faces found in the generated image.")
    source_face_count: int | None = Field(description="Faces found in the source image.")
    reasons: list[str] = Field(default_factory=list)
    model: str
    placeholder: bool


class AttributeCheck(BaseModel):
    enabled: bool = Field(description="Gender/age preservation (off by default: the original's service did "
                          "not check them).")
    passed: bool | None
    reasons: list[str] = Field(default_factory=list)
    gender: str | None = None
    source_gender: str | None = None
    age: float | None = None
    source_age: float | None = None


class VerifyChecks(BaseModel):
    nsfw: NSFWCheck
    clip: CLIPCheck
    identity: IdentityCheck
    attributes: AttributeCheck


class VerifyResponse(BaseModel):
    passed: bool = Field(description="Every enabled check passed (the real verdict, also in audit mode).")
    accepted: bool = Field(description="What a retry loop should read: passed, or true in audit mode.")
    audit: bool
    audit_reason: str | None = None
    failures: list[str] = Field(description="Every failing check as '<check>: <reason>' (udfs.mirror_images."
                                "image_verdicts).")
    checks: VerifyChecks
    placeholder_models: list[str] = Field(description="Evidence models that are placeholders.")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ClientRequest(_Strict):
    """The simulated client: chat messages -> the client's next line (SPEC B3 step 1)."""

    messages: list[ChatMessage] = Field(min_length=1)
    sampling: SamplingOverride | None = None


class CounselorRequest(_Strict):
    """The counselor VLM: image + chat messages -> the therapist's reply (SPEC B3 step 4).
    ``image`` is attached to the last user message (a literal ``<image>`` in its text is
    removed: the processor inserts the image tokens)."""

    messages: list[ChatMessage] = Field(min_length=1)
    image: ImageData | None = None
    sampling: SamplingOverride | None = None


class ChatResponse(_ModelInfo):
    reply: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    app: str
    deployments: dict[str, str] = Field(description="Backend deployment -> 'ok' or the error.")
    engines: dict[str, list[str]] = Field(default_factory=dict, description="Shared LLM engine deployment -> "
                                          "the roles it serves (one loaded model per spec).")
    models: dict[str, dict[str, Any]] = Field(description="Role -> resolved model (actors.models.describe()).")
    placeholder_roles: list[str]
    max_body_bytes: int
