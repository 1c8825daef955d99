"""MIRROR-LLaVA counselling services as one Ray Serve application (issue 10 part 3, SPEC B3, B5).

The original ran two Flask services (description on port 6000, verification on port 5000, one
GPU each) plus the client LLM and the counselor inside the inference script (SPEC B5, B6.8,
B6.10). Here they are one Serve application with typed HTTP APIs and Python handles::

    serve run jobs.mirror_llava_serve:app                               # offline recipe
    serve run jobs.mirror_llava_serve:build_app profile=paper            # bundled paper recipe
    serve run jobs.mirror_llava_serve:build_app recipe=my.yaml set=describe.batch_size=8
    python -m jobs.mirror_llava_serve --profile offline --port 8000     # ray.init + serve.run

Deployments (names as in ``serve status``), each built from the recipe stage of the same role
(``jobs/recipes/mirror_llava_serve.<profile>.yaml``; model, params, ``num_cpus``/``num_gpus``,
replicas = ``concurrency`` or autoscaling ``min_actors``..``max_actors``, ``batch_size`` =
``serve.batch`` size):

- ``MirrorLlavaAPI`` (stage ``ingress``): the FastAPI ingress; validation, prompts, verdicts;
- ``text_llm`` when ``client`` and ``describe`` use the same model spec and resources (one
  replica serves both roles; each request carries its own sampling and output schema), else
  ``client_llm`` and ``describe_llm``: ``actors.llm.LLMStage``;
- ``counselor_vlm``: ``actors.llm.LLMStage`` on a vision-language model (``placeholder:tiny-llava``
  offline; a ``mirror-llava-train`` checkpoint folder as ``counselor.model: {backend:
  transformers, model: /path/to/CKPT}`` loads as its base + the merged LoRA, ``actors.llm_hf``);
- ``generator``: ``actors.identity_t2i.IdentityText2Image``;
- ``verifier``: ``actors.faces.FaceAnalyzer`` + ``actors.clip.CLIPScorer`` +
  ``actors.nsfw.NSFWClassifier`` in one replica (the original's single verification service;
  recipe stages ``faces``/``clip``/``nsfw`` give their models and params, stage ``verify`` the
  replica's resources, the thresholds and the audit switch). Source-face results are cached
  per replica (LRU of 256, key = SHA-1 of the bytes): a session verifies up to 10 images per
  turn against one source face.

HTTP endpoints (JSON bodies need ``Content-Type: application/json``; images are base64
strings or ``data:`` URLs; every model response carries ``model`` and ``placeholder``):

========================  =====================================================================
``GET  /healthz``          200 ``HealthResponse``; 503 when a backend deployment does not answer
``POST /v1/describe``      ``DescribeRequest`` -> ``DescribeResponse`` (aligned + contrasting)
``POST /v1/generate``      ``GenerateRequest`` -> ``GenerateResponse`` (PNG, base64)
``POST /v1/verify``        ``VerifyRequest`` -> ``VerifyResponse`` (every score, pass/fail per check)
``POST /v1/client``        ``ClientRequest`` -> ``ChatResponse``
``POST /v1/counselor``     ``CounselorRequest`` -> ``ChatResponse``
``POST /describe``         the original's form fields ``history``, ``client_utt`` ->
                           ``{"response": "<2 lines>"}`` plus the ``DescribeResponse`` fields
``POST /verify``           the original's multipart ``image``, ``base_image`` (png/jpg/jpeg/gif)
                           + form ``statement``: 200 ``{"message": ...}`` when accepted, else 400
                           ``{"error": "Image verification failed."}``, both plus the report
========================  =====================================================================

Errors: 422 with a message for missing fields, wrong types, undecodable base64/images, bad
sampling values, a PhotoMaker prompt without its trigger word; 415 for a wrong request or
upload content type; 413 for a body over ``max_body_bytes`` (checked on Content-Length and
while reading chunked bodies, in a pure ASGI middleware: Serve has no body-size option, and an
exception raised from a wrapped ``receive()`` would surface as 400, notes/faces-train-serve.md
§2); 502 when a model replied with nothing usable (LLM reply that failed validation after its
repairs, a generation error). The original answered 400 for missing fields and 500 for
everything else (SPEC B5).

Python handles: ``serve.get_app_handle(app_name)`` exposes ``describe``, ``generate``,
``verify``, ``client``, ``counselor`` and ``health`` on the ingress; each takes the request
model (or a dict of its fields, bytes allowed for images) and returns the response model.
Errors reach the caller as ``fastapi.HTTPException`` (``status_code``, ``detail``) or
``pydantic.ValidationError``.

Thresholds (sources): NSFW = ``p(nsfw) >= p(normal)`` flags the image (MIRROR-LLaVA
``verify.py`` via ``actors.nsfw``, SPEC B5 check 1); CLIP cosine of the image and "A facial
photo with {stage direction}" >= **0.2** (SPEC B5 check 2, ViT-B/32); identity cosine >=
``udfs.faces.IDENTITY_THRESHOLDS[backend]["mirror_llava_inference"]`` = **0.3** for DeepFace
VGG-Face (SPEC B5 check 3; the dataset filter used 0.2) and **0.925** for dlib (measured on
real pairs, ``udfs.faces``). Gender and age are not checked (the original's service did not);
the recipe's ``verify.params.preservation`` can turn them on.

Audit mode: with ``verify.audit: null`` (default) a verification whose evidence comes from a
placeholder model (faces/CLIP/NSFW placeholders, or ``image_placeholder: true`` on the
request: the image came from a placeholder generator) runs in audit mode: every score and
verdict is reported, ``passed`` is the real verdict, ``accepted`` is true and
``audit_reason`` says why. ``accepted`` is what a retry loop should read.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError,
                      WithJsonSchema, field_validator, model_validator)
from ray import serve

from actors.models import ModelSpec, resolve
from jobs.core.recipe import Recipe, StageConfig, load_recipe
from udfs import faces as F
from udfs import mirror_images as MI
from udfs.llm_output import to_python

__all__ = ["ServeRecipe", "load_serve_recipe", "build_app", "BodyLimitMiddleware", "verification_report",
           "DescribeRequest", "DescribeResponse", "GenerateRequest", "GenerateResponse", "VerifyRequest",
           "VerifyResponse", "ClientRequest", "CounselorRequest", "ChatResponse", "HealthResponse",
           "ROLES", "STAGE_NAMES"]

PIPELINE = "mirror_llava_serve"
#: recipe stages: deployments (ingress, client, describe, counselor, generate, verify) and the
#: verifier's three models (faces, clip, nsfw: model + params only, they run in the verify replica)
STAGE_NAMES = ("ingress", "client", "describe", "counselor", "generate", "verify", "faces", "clip", "nsfw")
#: LLM roles served by ``actors.llm.LLMStage``
ROLES = ("client", "describe", "counselor")
#: model backends each model stage accepts (checked when the recipe is validated)
_BACKENDS = {"client": ("transformers", "openai", "openai_batch"), "describe": ("transformers", "openai"),
             "counselor": ("transformers", "openai"), "generate": ("diffusers",), "faces": ("dlib", "deepface"),
             "clip": ("open_clip",), "nsfw": ("transformers", "nudenet")}
#: environment variables passed on to every replica when set where the app is built
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "MMSYNTH_CACHE", "KERAS_BACKEND", "OMP_WAIT_POLICY",
              "TOKENIZERS_PARALLELISM", "DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE", "OPENAI_API_KEY",
              "VLLM_API_KEY")
#: upload content types the form ``/verify`` accepts (the original: png, jpg, jpeg, gif by extension)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
#: the original description service's two labelled lines (SPEC A4)
DESCRIPTION_LINES = ("Facial Expression Description: {aligned}\n"
                     "Contrasting Facial Expression Description: {contrasting}")


# ====================================================================== recipe

class ServeRecipe(Recipe):
    """Typed config of the Serve application (one YAML per profile, ``--set`` overrides).

    ``stages`` must name every entry of ``STAGE_NAMES``; model stages need a ``model`` whose
    backend fits the role (``_BACKENDS``). Per deployment: ``num_cpus``, ``num_gpus`` (Ray actor
    resources of each replica), ``concurrency`` (fixed replicas, default 1) or
    ``min_actors``/``max_actors`` (Serve autoscaling), ``batch_size`` (``serve.batch`` size:
    concurrent requests answered by one model call). ``verify.params`` is
    ``udfs.mirror_images.ImageFilterParams``; ``verify.audit`` forces audit mode on/off (None:
    automatic). ``max_retries``/``enabled`` of a stage are not used here.
    """

    pipeline: str = PIPELINE
    app_name: str = Field("mirror_llava", description="Serve application name (serve.get_app_handle).")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger "
                                "bodies get 413 (Content-Length or chunked).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="serve.batch: how long a replica waits to fill "
                                        "a batch before running it.")
    image_trigger: str = Field("img", description="PhotoMaker trigger word in the image prompt describe returns "
                               "(SPEC A6: 'portrait photo of a man img, ...').")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for every replica.")

    @model_validator(mode="after")
    def _stages(self):
        from actors.llm_base import LLMParams

        missing = [s for s in STAGE_NAMES if s not in self.stages]
        if missing:
            raise ValueError(f"stages missing: {', '.join(missing)} (need {', '.join(STAGE_NAMES)})")
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown stages: {', '.join(unknown)} (known: {', '.join(STAGE_NAMES)})")
        for name, backends in _BACKENDS.items():
            m = self.stages[name].model
            if m is None:
                raise ValueError(f"stages.{name}.model is required")
            if m.backend not in backends:
                raise ValueError(f"stages.{name}.model.backend must be one of {backends}, got {m.backend!r}")
        checks = [(role, LLMParams) for role in ROLES] + [("verify", MI.ImageFilterParams)]
        for name, model in checks:
            try:
                model.model_validate(self.stages[name].params)
            except ValidationError as exc:
                raise ValueError(f"stages.{name}.params: {_first_error(exc)}") from None
        return self

    def llm_params(self, role: str):
        """``LLMParams`` of an LLM role."""
        from actors.llm_base import LLMParams

        return LLMParams.model_validate(self.stages[role].params)

    def verify_params(self) -> MI.ImageFilterParams:
        """The verification thresholds (``ImageFilterParams``)."""
        return MI.ImageFilterParams.model_validate(self.stages["verify"].params)

    def shared_text_llm(self) -> bool:
        """True when ``client`` and ``describe`` can share one replica: same model spec and
        resources, and neither uses a regex/EBNF format (those are stage-level only)."""
        c, d = self.stages["client"], self.stages["describe"]
        same = all(getattr(c, k) == getattr(d, k) for k in ("model", "num_cpus", "num_gpus", "concurrency",
                                                            "min_actors", "max_actors", "batch_size"))
        plain = all(not (self.stages[r].params.get("regex") or self.stages[r].params.get("ebnf"))
                    for r in ("client", "describe"))
        return same and plain


def load_serve_recipe(profile: str | None = "offline", recipe_file: str | None = None,
                      overrides: list[str] | None = None) -> ServeRecipe:
    """The bundled (or given) recipe with ``key.path=value`` overrides, validated.
    Raises ``jobs.core.recipe.RecipeError`` with a one-line message."""
    return load_recipe(ServeRecipe, PIPELINE, profile, recipe_file, overrides)


# ====================================================================== request / response models

def _decode_image(value: Any) -> bytes:
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
ImageData = Annotated[bytes, PlainValidator(_decode_image),
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
    from udfs.mirror import parse_line

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
    models: dict[str, dict[str, Any]] = Field(description="Role -> resolved model (actors.models.describe()).")
    placeholder_roles: list[str]
    max_body_bytes: int


# ====================================================================== ASGI body limit

class BodyLimitMiddleware:
    """Pure ASGI middleware: answer 413 for a request body over ``max_bytes``.

    Checks ``Content-Length`` first, then reads the body (chunked or not) up to the limit,
    answering 413 itself as soon as it is exceeded; otherwise the buffered body is replayed to
    the app as one message. (Raising from a wrapped ``receive()`` becomes a 400 "Invalid
    multipart data" in FastAPI: notes/faces-train-serve.md §2.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return await self._reject(send)
                except ValueError:
                    pass
        chunks, total, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._reject(send)
            chunks.append(body)
            more = msg.get("more_body", False)
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ====================================================================== backend deployments

def _column(values: list) -> Any:
    from actors.batching import object_column

    return object_column(values)


class _Batched:
    """Common part of the backends: ``serve.batch`` size/timeout from the recipe, the blocking
    model call in a worker thread (the replica's event loop keeps answering health checks), one
    batch at a time per replica (``max_concurrent_batches`` = 1: the actors are not thread-safe)."""

    def _configure(self, method, max_batch_size: int, wait_s: float) -> None:
        method.set_max_batch_size(int(max_batch_size))
        method.set_batch_wait_timeout_s(float(wait_s))

    def check_health(self) -> None:
        """Serve's periodic health check: the replica is alive (its model loaded in __init__)."""

    def ping(self) -> str:
        return "ok"


class LLMServer(_Batched):
    """``actors.llm.LLMStage`` behind ``serve.batch``. ``chat(row)``: ``row`` = ``{"id",
    "messages": JSON str, "sampling": JSON str, "response_format": JSON schema str | None}``
    -> ``{"text", "parsed", "finish_reason", "prompt_tokens", "completion_tokens",
    "attempts", "error", "reject"}``."""

    def __init__(self, model: dict, params: dict, max_batch_size: int, wait_s: float):
        from actors.llm import LLMStage

        self.stage = LLMStage(model, params)
        self._configure(self.chat, max_batch_size, wait_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def chat(self, rows: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, rows)

    def _run(self, rows: list[dict]) -> list[dict]:
        from udfs import rows as R

        batch = {"id": _column([r["id"] for r in rows]), "messages": _column([r["messages"] for r in rows]),
                 "sampling": _column([r.get("sampling") for r in rows]),
                 "response_format": _column([r.get("response_format") for r in rows])}
        out = self.stage(batch)
        return [{"text": to_python(out["generated_text"][i]), "parsed": to_python(out["parsed"][i]),
                 "finish_reason": to_python(out["finish_reason"][i]),
                 "prompt_tokens": int(out["prompt_tokens"][i]), "completion_tokens": int(out["completion_tokens"][i]),
                 "attempts": int(out["llm_attempts"][i]), "error": to_python(out[R.ROW_ERROR][i]),
                 "reject": to_python(out[R.ROW_REJECT][i])} for i in range(len(rows))]


class GeneratorServer(_Batched):
    """``actors.identity_t2i.IdentityText2Image`` behind ``serve.batch`` (rows of different
    clients in one pipeline call, each with its own face and seed). ``generate(row)``:
    ``{"id", "prompt", "negative_prompt", "face_image": bytes, "seed": int | None}`` ->
    ``{"png": bytes | None, "seed", "identity_method", "steps", "width", "height", "error"}``."""

    def __init__(self, model: dict, params: dict, max_batch_size: int, wait_s: float):
        from actors.identity_t2i import IdentityText2Image

        params = {**params, "output_dir": ""}  # PNG bytes back, nothing written
        self.stage = IdentityText2Image(model, params)
        self._configure(self.generate, max_batch_size, wait_s)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def generate(self, rows: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, rows)

    def _run(self, rows: list[dict]) -> list[dict]:
        from udfs import rows as R

        p = self.stage.params
        batch = {"id": _column([r["id"] for r in rows]), p.prompt_column: _column([r["prompt"] for r in rows]),
                 p.negative_column: _column([r.get("negative_prompt") or None for r in rows]),
                 p.face_column: _column([r["face_image"] for r in rows]),
                 p.seed_column: _column([r.get("seed") for r in rows])}
        out = self.stage(batch)
        return [{"png": out["image_png"][i], "seed": to_python(out["seed"][i]),
                 "identity_method": to_python(out["identity_method"][i]), "steps": int(out["gen_steps"][i]),
                 "width": to_python(out["gen_width"][i]), "height": to_python(out["gen_height"][i]),
                 "error": to_python(out[R.ROW_ERROR][i])} for i in range(len(rows))]


class VerifierServer(_Batched):
    """Face analysis of the generated and source images, CLIP similarity and NSFW score of
    the generated image, in one replica. ``verify(row)``: ``{"id", "image": bytes,
    "source_image": bytes, "clip_text": str}`` -> ``{"faces": {FACE_COLUMNS}, "source_faces":
    {...}, "clip_scores": [float], "nsfw": bool, "nsfw_score": float, "nsfw_scores": {label:
    p}, "error": str | None}``. Verdicts are the ingress's (``verification_report``)."""

    CACHE = 256

    def __init__(self, faces: dict, clip: dict, nsfw: dict, max_batch_size: int, wait_s: float):
        from actors.clip import CLIPScorer
        from actors.faces import FaceAnalyzer
        from actors.nsfw import NSFWClassifier

        self.faces = FaceAnalyzer(faces["model"], {**faces["params"], "image_column": "image"})
        self.clip = CLIPScorer(clip["model"], {**clip["params"], "mode": "similarity", "image_column": "image",
                                               "text_column": "text"})
        self.nsfw = NSFWClassifier(nsfw["model"], {**nsfw["params"], "image_column": "image"})
        self._sources: OrderedDict[str, dict] = OrderedDict()
        self._configure(self.verify, max_batch_size, wait_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def verify(self, rows: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, rows)

    def _face_row(self, out: dict, i: int) -> dict:
        from actors.faces import FACE_COLUMNS
        from udfs import rows as R

        d = {c: to_python(out[c][i]) for c in FACE_COLUMNS}
        d["error"] = to_python(out[R.ROW_ERROR][i])
        return d

    def _run(self, rows: list[dict]) -> list[dict]:
        from udfs import rows as R

        n = len(rows)
        keys = [hashlib.sha1(r["source_image"]).hexdigest() for r in rows]
        sources = {k: self._sources[k] for k in keys if k in self._sources}
        todo = {k: r["source_image"] for k, r in zip(keys, rows) if k not in sources}
        ids = [f"{r['id']}:image" for r in rows] + [f"source:{k[:16]}" for k in todo]
        images = [r["image"] for r in rows] + list(todo.values())
        fo = self.faces({"id": _column(ids), "image": _column(images)})
        for j, k in enumerate(todo):
            sources[k] = self._face_row(fo, n + j)
            if sources[k]["error"] is None:  # errors are not cached
                self._sources[k] = sources[k]
        for k in keys:
            if k in self._sources:
                self._sources.move_to_end(k)
        while len(self._sources) > self.CACHE:
            self._sources.popitem(last=False)
        gen = {"id": _column(ids[:n]), "image": _column(images[:n])}
        co = self.clip({**gen, "text": _column([r["clip_text"] for r in rows])})
        no = self.nsfw(gen)
        out = []
        for i, k in enumerate(keys):
            faces, src = self._face_row(fo, i), dict(sources[k])
            errs = [e for e in (faces.pop("error"), src.pop("error"), to_python(co[R.ROW_ERROR][i]),
                                to_python(no[R.ROW_ERROR][i])) if e]
            scores = to_python(no["nsfw_scores"][i])
            out.append({"faces": faces, "source_faces": src, "clip_scores": to_python(co["clip_scores"][i]),
                        "nsfw": to_python(no["nsfw"][i]), "nsfw_score": to_python(no["nsfw_score"][i]),
                        "nsfw_scores": json.loads(scores) if scores else {}, "error": "; ".join(errs) or None})
        return out


# ====================================================================== verdicts (pure)

def verification_report(raw: dict, params: MI.ImageFilterParams, clip_text: str, models: dict[str, dict],
                        audit_forced: bool | None, image_placeholder: bool = False) -> VerifyResponse:
    """The verify response from the verifier's raw scores (pure; unit-testable).

    ``raw``: ``VerifierServer.verify``'s reply. ``models``: role -> ``ResolvedModel.describe()``
    for ``faces``, ``clip``, ``nsfw``. ``audit_forced``: the recipe's ``verify.audit`` (None:
    audit when an evidence model is a placeholder or ``image_placeholder``). Verdicts come from
    ``udfs.mirror_images.image_verdicts`` (thresholds: see the module docstring)."""
    pp = params.preservation
    row = dict(raw["faces"])
    row.update({pp.source_prefix + k: v for k, v in raw["source_faces"].items()})
    row.update(clip_scores=raw["clip_scores"], nsfw=raw["nsfw"], nsfw_score=raw["nsfw_score"])
    failures, sim = MI.image_verdicts(row, params)
    backend = str(raw["faces"].get("face_backend") or models["faces"]["backend"])
    id_on = pp.identity_use is not None or pp.min_identity is not None
    threshold = pp.min_identity if pp.min_identity is not None else (
        F.identity_threshold(backend, pp.identity_use) if pp.identity_use else None)
    id_fails = [f for f in failures if f.startswith(("face:", "identity"))]
    attr_on = pp.check_gender or pp.max_age_gap is not None
    attr_fails = [f for f in failures if f.startswith(("gender", "age"))]
    scores = raw["clip_scores"] or []
    clip = float(scores[0]) if scores else None
    placeholders = [f"{r} ({models[r]['model']})" for r in ("faces", "clip", "nsfw") if models[r]["placeholder"]]
    if image_placeholder:
        placeholders.append("image (placeholder generator)")
    audit = bool(placeholders) if audit_forced is None else bool(audit_forced)
    reason = None
    if audit:
        reason = (f"evidence from placeholder models: {', '.join(placeholders)}" if audit_forced is None
                  else "audit mode set in the recipe (verify.audit: true)")
    nsfw_flag = raw["nsfw"]
    checks = VerifyChecks(
        nsfw=NSFWCheck(enabled=params.check_nsfw, passed=(not nsfw_flag) if params.check_nsfw else None,
                       score=raw["nsfw_score"], flagged=nsfw_flag, scores=raw["nsfw_scores"] or {},
                       model=models["nsfw"]["model"], placeholder=models["nsfw"]["placeholder"]),
        clip=CLIPCheck(passed=clip is not None and clip >= params.min_clip, score=clip, threshold=params.min_clip,
                       text=clip_text, model=models["clip"]["model"], placeholder=models["clip"]["placeholder"]),
        identity=IdentityCheck(enabled=id_on, passed=(not id_fails) if id_on else None, similarity=sim,
                               threshold=threshold, backend=backend, use=pp.identity_use,
                               face_count=raw["faces"].get("face_count"),
                               source_face_count=raw["source_faces"].get("face_count"), reasons=id_fails,
                               model=models["faces"]["model"], placeholder=models["faces"]["placeholder"]),
        attributes=AttributeCheck(enabled=attr_on, passed=(not attr_fails) if attr_on else None, reasons=attr_fails,
                                  gender=raw["faces"].get("gender"), source_gender=raw["source_faces"].get("gender"),
                                  age=raw["faces"].get("age"), source_age=raw["source_faces"].get("age")))
    passed = not failures
    return VerifyResponse(passed=passed, accepted=passed or audit, audit=audit, audit_reason=reason,
                          failures=failures, checks=checks, placeholder_models=placeholders)


# ====================================================================== ingress

def _error_status(error: str) -> int:
    """Row error text -> HTTP status: invalid input (``InputError``/``MessagesError``) 422, else 502."""
    return 422 if error.split(":", 1)[0] in ("InputError", "MessagesError", "ValueError") else 502


def _strip_image_token(content: Any) -> Any:
    if isinstance(content, str):
        return content.replace("<image>\n", "").replace("<image>", "")
    return content


def _ingress_cls(max_body_bytes: int):
    """The FastAPI ingress deployment class, built per app: Serve freezes a copy of the FastAPI
    app at decoration time, so the body limit (a middleware argument) is fixed here."""
    app = FastAPI(title="MIRROR-LLaVA counselling services", version="1",
                  description="describe / generate / verify / client / counselor (issue 10 part 3)")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        """422 with ``loc``/``msg``/``type`` per error: FastAPI's default echoes every input,
        which for an image field is the whole base64 payload."""
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "type": e.get("type")}
            for e in exc.errors()]})

    def content_type(*allowed: str):
        async def check(request: Request) -> None:
            ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ct not in allowed:
                raise HTTPException(415, f"unsupported content type {ct or '(none)'!r}; send {' or '.join(allowed)}")
        return Depends(check)

    as_json = content_type("application/json")
    as_form = content_type("multipart/form-data", "application/x-www-form-urlencoded")
    as_multipart = content_type("multipart/form-data")

    async def read_upload(upload: UploadFile, field: str) -> bytes:
        ct = (upload.content_type or "").split(";")[0].strip().lower()
        ext = os.path.splitext(upload.filename or "")[1].lower()
        if ct not in IMAGE_TYPES and not (ct in ("", "application/octet-stream") and ext in IMAGE_EXTENSIONS):
            raise HTTPException(415, f"{field}: unsupported image type {ct or '(none)'!r} "
                                f"(allowed: png, jpg, jpeg, gif, webp)")
        try:
            return _decode_image(await upload.read())
        except ValueError as exc:
            raise HTTPException(422, f"{field}: {exc}") from None

    @serve.deployment
    @serve.ingress(app)
    class MirrorLlavaAPI:
        """HTTP routes and handle methods (see the module docstring)."""

        def __init__(self, client, describe, counselor, generator, verifier, settings: dict):
            from actors.llm_base import LLMParams

            self.llm = {"client": client, "describe": describe, "counselor": counselor}
            self.generator, self.verifier = generator, verifier
            self.settings = settings
            self.params = {r: LLMParams.model_validate(settings["llm_params"][r]) for r in ROLES}
            self.formats = {}
            for r in ROLES:
                fmt = self.params[r].output_format()
                self.formats[r] = json.dumps(fmt.schema) if fmt.kind == "json_schema" else None
            if self.formats["describe"] is None:  # describe always answers in the ExpressionReply schema
                self.formats["describe"] = json.dumps(MI.ExpressionReply.model_json_schema())
            self.verify_params = MI.ImageFilterParams.model_validate(settings["verify_params"])
            self.models = settings["models"]

        # ------------------------------------------------------------ helpers

        def _info(self, role: str) -> dict:
            return {"model": self.models[role]["model"], "placeholder": bool(self.models[role]["placeholder"])}

        async def _chat(self, role: str, messages: list[dict], sampling: SamplingOverride | None) -> dict:
            from udfs.llm_output import normalize_messages, with_system_prompt

            params = self.params[role]
            try:
                samp = params.sampling(sampling.model_dump(exclude_none=True) if sampling else None)
            except (ValidationError, ValueError) as exc:
                raise HTTPException(422, f"sampling: {exc}") from None
            try:
                msgs = with_system_prompt(normalize_messages(messages), params.system_prompt)
            except ValueError as exc:
                raise HTTPException(422, f"messages: {exc}") from None
            row = {"id": uuid.uuid4().hex[:16], "messages": json.dumps(msgs), "sampling": json.dumps(samp),
                   "response_format": self.formats[role]}
            out = await self.llm[role].chat.remote(row)
            if out["error"]:
                raise HTTPException(_error_status(out["error"]), f"{role}: {out['error']}")
            if out["reject"]:
                raise HTTPException(502, f"{role}: {out['reject']}")
            return out

        # ------------------------------------------------------------ handle API

        async def describe(self, req: DescribeRequest | dict) -> DescribeResponse:
            """Aligned + contrasting expression of the client's newest line (SPEC A4, B5)."""
            req = DescribeRequest.model_validate(req)
            msgs = MI.expression_messages([t.model_dump() for t in req.history], req.utterance.model_dump())
            out = await self._chat("describe", msgs, req.sampling)
            try:
                reply = MI.ExpressionReply.model_validate_json(out["parsed"] or "")
            except ValidationError as exc:
                raise HTTPException(502, f"describe: reply does not fit ExpressionReply: {_first_error(exc)}") from None
            prompt = negative = None
            if req.gender:
                prompt, negative = MI.image_prompt(req.gender, reply.aligned, reply.contrasting,
                                                   self.settings["image_trigger"])
            return DescribeResponse(aligned=reply.aligned, contrasting=reply.contrasting,
                                    response=DESCRIPTION_LINES.format(aligned=reply.aligned,
                                                                      contrasting=reply.contrasting),
                                    prompt=prompt, negative_prompt=negative,
                                    clip_text=MI.clip_text(req.utterance.stage_direction),
                                    prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                    attempts=out["attempts"], **self._info("describe"))

        async def generate(self, req: GenerateRequest | dict) -> GenerateResponse:
            """One identity-preserving image of the source face (SPEC A7, B3 step 2)."""
            req = GenerateRequest.model_validate(req)
            rid = hashlib.sha1(b"\0".join([req.prompt.encode(), req.negative_prompt.encode(),
                                           req.source_image])).hexdigest()[:16]
            out = await self.generator.generate.remote({"id": rid, "prompt": req.prompt,
                                                        "negative_prompt": req.negative_prompt,
                                                        "face_image": req.source_image, "seed": req.seed})
            if out["error"]:
                raise HTTPException(_error_status(out["error"]), f"generate: {out['error']}")
            return GenerateResponse(image_png_b64=base64.b64encode(out["png"]).decode("ascii"), seed=out["seed"],
                                    width=out["width"], height=out["height"], identity_method=out["identity_method"],
                                    steps=out["steps"], **self._info("generate"))

        async def verify(self, req: VerifyRequest | dict) -> VerifyResponse:
            """NSFW, CLIP and identity checks with every score (SPEC B5)."""
            req = VerifyRequest.model_validate(req)
            text = MI.clip_text(req.stage_direction)
            raw = await self.verifier.verify.remote({"id": uuid.uuid4().hex[:16], "image": req.image,
                                                     "source_image": req.source_image, "clip_text": text})
            if raw["error"]:
                raise HTTPException(_error_status(raw["error"]), f"verify: {raw['error']}")
            return verification_report(raw, self.verify_params, text, self.models, self.settings["audit"],
                                       req.image_placeholder)

        async def client(self, req: ClientRequest | dict) -> ChatResponse:
            """The simulated client's next line (SPEC B3 step 1)."""
            req = ClientRequest.model_validate(req)
            out = await self._chat("client", [m.model_dump() for m in req.messages], req.sampling)
            return ChatResponse(reply=out["text"] or "", finish_reason=out["finish_reason"],
                                prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                **self._info("client"))

        async def counselor(self, req: CounselorRequest | dict) -> ChatResponse:
            """The counselor VLM's reply to the conversation and the client's face (SPEC B3 step 4)."""
            req = CounselorRequest.model_validate(req)
            msgs = [m.model_dump() for m in req.messages]
            if req.image is not None:
                from udfs.images import image_data_url

                users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
                if not users:
                    raise HTTPException(422, "counselor: an image needs a user message to attach to")
                m = msgs[users[-1]]
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                parts = [{**p, "text": _strip_image_token(p["text"])} if p.get("type") == "text" else p for p in parts]
                url = image_data_url(req.image, "request", "image", max_side=1024, image_format="png")
                m["content"] = [{"type": "image_url", "image_url": {"url": url}}, *parts]
            out = await self._chat("counselor", msgs, req.sampling)
            return ChatResponse(reply=out["text"] or "", finish_reason=out["finish_reason"],
                                prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
                                **self._info("counselor"))

        async def health(self) -> HealthResponse:
            """Ping every backend deployment (5 s each)."""
            backends = {"describe": self.llm["describe"], "client": self.llm["client"],
                        "counselor": self.llm["counselor"], "generator": self.generator, "verifier": self.verifier}
            names = self.settings["deployments"]

            async def ping(h):
                try:
                    return await asyncio.wait_for(h.ping.remote(), 5.0)
                except Exception as exc:  # noqa: BLE001 - reported, not raised
                    return f"{type(exc).__name__}: {exc}"[:300]
            results = await asyncio.gather(*(ping(h) for h in backends.values()))
            deployments = {names[k]: r for k, r in zip(backends, results)}
            return HealthResponse(status="ok" if all(r == "ok" for r in results) else "degraded",
                                  app=self.settings["app_name"], deployments=deployments, models=self.models,
                                  placeholder_roles=[r for r, m in self.models.items() if m["placeholder"]],
                                  max_body_bytes=self.settings["max_body_bytes"])

        # ------------------------------------------------------------ HTTP routes

        @app.get("/healthz", response_model=HealthResponse)
        async def http_health(self):
            h = await self.health()
            return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

        @app.post("/v1/describe", response_model=DescribeResponse, dependencies=[as_json])
        async def http_describe(self, req: DescribeRequest) -> DescribeResponse:
            return await self.describe(req)

        @app.post("/v1/generate", response_model=GenerateResponse, dependencies=[as_json])
        async def http_generate(self, req: GenerateRequest) -> GenerateResponse:
            return await self.generate(req)

        @app.post("/v1/verify", response_model=VerifyResponse, dependencies=[as_json])
        async def http_verify(self, req: VerifyRequest) -> VerifyResponse:
            return await self.verify(req)

        @app.post("/v1/client", response_model=ChatResponse, dependencies=[as_json])
        async def http_client(self, req: ClientRequest) -> ChatResponse:
            return await self.client(req)

        @app.post("/v1/counselor", response_model=ChatResponse, dependencies=[as_json])
        async def http_counselor(self, req: CounselorRequest) -> ChatResponse:
            return await self.counselor(req)

        @app.post("/describe", dependencies=[as_form])
        async def form_describe(self, client_utt: str = Form(..., max_length=4000),
                                history: str = Form("", max_length=200_000)):
            """The original description API: form fields ``history`` (text lines) and
            ``client_utt`` -> ``{"response": "<two labelled lines>"}`` (+ our fields)."""
            try:
                req = DescribeRequest(history=history, utterance=client_utt)
            except ValidationError as exc:
                raise HTTPException(422, _first_error(exc)) from None
            return (await self.describe(req)).model_dump()

        @app.post("/verify", dependencies=[as_multipart])
        async def form_verify(self, image: UploadFile = File(...), base_image: UploadFile = File(...),
                              statement: str = Form(..., max_length=4000)):
            """The original verification API: multipart ``image``, ``base_image`` + form
            ``statement`` (the client line; its first ``[...]`` is the stage direction, else the
            whole statement: the original raised on a line without brackets, SPEC B6.7)."""
            m = re.search(r"\[(.*?)\]", statement)
            direction = (m.group(1) if m and m.group(1).strip() else statement).strip()
            try:
                req = VerifyRequest(image=await read_upload(image, "image"),
                                    source_image=await read_upload(base_image, "base_image"),
                                    stage_direction=direction[:200])
            except ValidationError as exc:
                raise HTTPException(422, _first_error(exc)) from None
            rep = (await self.verify(req)).model_dump()
            if rep["accepted"]:
                return JSONResponse({"message": "Image verification passed." if rep["passed"] else
                                     "Image verification recorded (audit mode).", **rep})
            return JSONResponse({"error": "Image verification failed.", **rep}, status_code=400)

    return MirrorLlavaAPI


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"


# ====================================================================== app builder

def _deployment_options(stage: StageConfig, env: dict[str, str]) -> dict:
    """Serve options of one deployment from its recipe stage."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus},
                            "max_ongoing_requests": max(8, 2 * stage.batch_size)}
    if env:
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env)}
    lo, hi = stage.pool_bounds()
    if stage.min_actors or stage.max_actors:
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo}
    else:
        opts["num_replicas"] = lo
    return opts


def _as_recipe(config: Any) -> ServeRecipe:
    if config is None:
        return load_serve_recipe("offline")
    if isinstance(config, ServeRecipe):
        return config
    if isinstance(config, dict):
        builder_keys = {"recipe", "profile", "set"}
        if set(config) <= builder_keys:  # `serve run ...:build_app profile=paper set=a.b=1,c.d=2`
            sets = config.get("set") or []
            sets = [s for s in sets.split(",") if s] if isinstance(sets, str) else list(sets)
            return load_serve_recipe(config.get("profile"), config.get("recipe"), sets)
        return ServeRecipe.model_validate(config)
    raise TypeError(f"build_app config must be a ServeRecipe, a dict or None, got {type(config).__name__}")


def build_app(config: ServeRecipe | dict | None = None):
    """The Serve application (``serve.run(build_app(recipe), name=recipe.app_name)``).

    ``config``: a ``ServeRecipe``; a recipe dict; ``{"profile": ..., "recipe": path, "set":
    "a.b=1,c.d=2"}`` (what ``serve run module:build_app key=value`` passes); or None (offline
    recipe). Resolves every model spec (nothing is loaded here: replicas load their models).
    Raises ``jobs.core.recipe.RecipeError``/``pydantic.ValidationError`` for a bad recipe and
    ``actors.models.ModelResolutionError`` for a model that cannot be resolved.
    """
    recipe = _as_recipe(config)
    if recipe.profile == "offline":
        os.environ["HF_HUB_OFFLINE"] = "1"
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if recipe.profile == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    env.update(recipe.env)
    st = recipe.stages
    resolved = {name: resolve(ModelSpec.model_validate(st[name].model)) for name in _BACKENDS}
    models = {name: r.describe() for name, r in resolved.items()}
    wait = recipe.batch_wait_timeout_s

    deployments: dict[str, str] = {}

    def llm(role: str, name: str, params: dict):
        deployments[role] = name
        s = st[role]
        return serve_deployment(LLMServer, name, s, env).bind(resolved[role].model_dump(), params, s.batch_size, wait)

    def stage_params(role: str) -> dict:  # the stage's own params; system prompt and schema are per request
        return {k: v for k, v in st[role].params.items() if k not in ("system_prompt", "response_schema")}

    if recipe.shared_text_llm():
        repairs = max(recipe.llm_params(r).max_repairs for r in ("client", "describe"))
        text = llm("describe", "text_llm", {"max_repairs": repairs})
        deployments["client"] = "text_llm"
        client = text
    else:
        client = llm("client", "client_llm", stage_params("client"))
        text = llm("describe", "describe_llm", stage_params("describe"))
    counselor = llm("counselor", "counselor_vlm", stage_params("counselor"))
    gen = st["generate"]
    deployments["generator"] = "generator"
    generator = serve_deployment(GeneratorServer, "generator", gen, env).bind(
        resolved["generate"].model_dump(), gen.params, gen.batch_size, wait)
    ver = st["verify"]
    deployments["verifier"] = "verifier"
    verifier = serve_deployment(VerifierServer, "verifier", ver, env).bind(
        *({"model": resolved[k].model_dump(), "params": st[k].params} for k in ("faces", "clip", "nsfw")),
        ver.batch_size, wait)
    settings = {"app_name": recipe.app_name, "max_body_bytes": recipe.max_body_bytes,
                "image_trigger": recipe.image_trigger, "audit": ver.audit,
                "verify_params": recipe.verify_params().model_dump(),
                "llm_params": {r: st[r].params for r in ROLES}, "models": models, "deployments": deployments}
    api = _ingress_cls(recipe.max_body_bytes)
    return serve_deployment(api, "MirrorLlavaAPI", st["ingress"], env).bind(
        client, text, counselor, generator, verifier, settings)


def serve_deployment(cls, name: str, stage: StageConfig, env: dict[str, str]):
    """``cls`` (a plain class or an ``@serve.deployment``) as a named deployment with the
    stage's resources and replicas."""
    from ray import serve
    from ray.serve.deployment import Deployment

    dep = cls if isinstance(cls, Deployment) else serve.deployment(cls)
    return dep.options(name=name, **_deployment_options(stage, env))


def __getattr__(name: str):
    """``app``: the offline application, built on first access (``serve run
    jobs.mirror_llava_serve:app``); building on import would resolve models in every replica."""
    if name == "app":
        return build_app(None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ====================================================================== command line

def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.mirror_llava_serve``: start (or join) Ray, run the app, block."""
    import time

    ap = argparse.ArgumentParser(prog="python -m jobs.mirror_llava_serve", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["offline", "paper"], default=None)
    ap.add_argument("--recipe", help="recipe YAML (default: the bundled one for the profile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a new local cluster)")
    ap.add_argument("--dry-run", action="store_true", help="validate the recipe and resolve models only")
    args = ap.parse_args(argv)
    try:
        recipe = load_serve_recipe(args.profile or ("offline" if not args.recipe else None), args.recipe, args.set)
        app = build_app(recipe)
    except ValueError as exc:  # RecipeError, ModelResolutionError
        print(f"error: {exc}")
        return 2
    if args.dry_run:
        print(f"recipe ok: {recipe.app_name}, profile {recipe.profile}")
        return 0
    import ray
    from ray import serve

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=recipe.app_name, route_prefix=recipe.route_prefix)
    print(f"serving {recipe.app_name} on http://{args.host}:{args.port}{recipe.route_prefix} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
