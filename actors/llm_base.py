"""Shared types of the LLM stage and its backends: parameters, requests, replies, and the wire
form in which requests and replies travel between a stage and a shared engine
(``actors.llm_engine``; plain JSON-able dicts, so an engine may run in another virtual
environment, e.g. the CPU build of vLLM).

Kept apart from ``actors.llm`` so backends (``llm_hf``, ``llm_openai``, ``llm_batch``,
``llm_vllm``) can import them without importing the stage (no import cycles).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.batching import error_text
from udfs import rows
from udfs.llm_output import (OutputFormat, normalize_messages, normalize_sampling, output_format,
                             with_system_prompt)

#: columns every LLM backend adds (one entry per row)
OUTPUT_COLUMNS = ["generated_text", "parsed", "finish_reason", "prompt_tokens", "completion_tokens",
                  "llm_backend", "llm_model", "llm_attempts", "llm_repaired", "llm_cache_hits", "llm_cache_misses",
                  "llm_cached_prompt_tokens", "llm_cached_completion_tokens"]
#: optional per-row input columns
OPTIONAL_INPUT_COLUMNS = ["sampling", "response_format"]


class Sampling(BaseModel):
    """Sampling parameters (OpenAI chat-completions semantics). Also the keys a row's
    ``sampling`` column (a JSON object string) may override."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=2.0,
                               description="Softmax temperature; 0 means greedy decoding (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set "
                                                         "whose probability mass reaches top_p.")
    max_tokens: int = Field(512, ge=1, description="Maximum number of generated tokens per attempt.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                     description="Subtract penalty x (count of the token in the reply so far) "
                                                 "from its logit.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                    description="Subtract penalty from the logit of every token already in the reply.")
    seed: int | None = Field(None, description="Sampling seed. transformers: rows generated in one batch share "
                                               "one generator seeded with it, so a sampled reply depends on the "
                                               "batch it was generated in (greedy replies do not). API backends "
                                               "pass it on (best effort on the provider side).")


class LLMParams(Sampling):
    """Parameters of one LLM stage (a recipe's ``stage.params``). Field descriptions are the docs."""

    response_schema: str | dict[str, Any] | type[BaseModel] | None = Field(
        None, description="Schema replies must satisfy: import path 'module:Class' of a pydantic model, a pydantic "
                          "class, or an inline JSON-schema dict (also an OpenAI response_format object). "
                          "Enables JSON parsing, validation, repair and (transformers/vllm) constrained decoding.")
    regex: str | None = Field(None, description="Replies must full-match this regular expression (constrained "
                                                "decoding on transformers/vllm). Exclusive with response_schema/ebnf.")
    ebnf: str | None = Field(None, description="EBNF grammar (xgrammar/GBNF dialect, root rule 'root') that "
                                               "constrains decoding on transformers/vllm; replies are accepted as "
                                               "produced. Exclusive with response_schema/regex.")
    max_repairs: int = Field(2, ge=0, description="How many times a reply that fails validation is re-asked "
                                                  "(with the error) before the row is rejected.")
    system_prompt: str | None = Field(None, description="System message prepended to rows whose messages do "
                                                        "not start with a system message.")
    max_input_tokens: int | None = Field(None, ge=1, description="Longest chat-templated prompt in tokens; a "
                                         "longer row is rejected before any generation, its reason naming the "
                                         "count (the engine's context window always applies too). Keeps one "
                                         "oversized input from costing a batch its throughput.")

    @model_validator(mode="after")
    def _one_format(self):
        self.output_format()  # raises ValueError for conflicting/invalid formats
        return self

    def output_format(self) -> OutputFormat:
        """The stage-level ``OutputFormat`` (``text`` when no schema/regex/ebnf is set)."""
        return output_format(self.response_schema, self.regex, self.ebnf)

    def sampling(self, override: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stage sampling values merged with a row override, validated. Raises ``ValueError``."""
        base = {k: getattr(self, k) for k in Sampling.model_fields}
        if override:
            base.update(override)
        return Sampling.model_validate(base).model_dump()


@dataclass
class LLMRequest:
    """One row's call: chat ``messages`` (plain OpenAI format, no ``None`` values), merged
    ``sampling`` dict, the row's ``OutputFormat``; ``index`` is the row's position in the batch."""

    index: int
    row_id: str | None
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    fmt: OutputFormat
    original: list[dict[str, Any]] = field(default_factory=list)
    max_input_tokens: int | None = None


@dataclass
class LLMReply:
    """One generated reply: text, ``finish_reason`` (``stop``/``length``/provider value), token counts."""

    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PromptTooLongError(ValueError):
    """A chat-templated prompt longer than the engine's context window or the stage's
    ``max_input_tokens``. Raised (returned as a reply) before any generation; the stage
    rejects the row with this message, which names the token count."""

    def __init__(self, tokens: int, limit: int, what: str):
        self.tokens, self.limit, self.what = int(tokens), int(limit), what
        super().__init__(f"prompt has {self.tokens} tokens; {what} is {self.limit}")


def check_prompt_length(tokens: int, context: int | None, max_input_tokens: int | None) -> None:
    """Raise ``PromptTooLongError`` when ``tokens`` leaves no room to generate in a ``context``
    window (tokens >= context) or exceeds ``max_input_tokens``; the error names the smaller of
    the limits that ``tokens`` passes."""
    limits = []
    if context:
        limits.append((context - 1, "the most the model's context window leaves room for"))
    if max_input_tokens:
        limits.append((max_input_tokens, "the stage's max_input_tokens"))
    over = sorted(x for x in limits if tokens > x[0])
    if over:
        raise PromptTooLongError(tokens, *over[0])


class EngineError(RuntimeError):
    """A per-request failure reported by a shared engine; ``str()`` is the engine's
    ``"ExceptionType: message"`` text, kept as the row's error."""


def request_to_wire(req: "LLMRequest") -> dict[str, Any]:
    """``LLMRequest`` -> a JSON-able dict for a shared engine (the format travels as kind,
    schema and grammar; the pydantic model class of a schema stays with the stage)."""
    return {"index": req.index, "row_id": req.row_id, "messages": req.messages, "sampling": req.sampling,
            "format": {"kind": req.fmt.kind, "schema": req.fmt.schema, "grammar": req.fmt.grammar},
            "max_input_tokens": req.max_input_tokens}


def request_from_wire(d: dict[str, Any]) -> "LLMRequest":
    """The engine side of ``request_to_wire``."""
    f = d.get("format") or {}
    return LLMRequest(index=int(d["index"]), row_id=d.get("row_id"), messages=d["messages"], sampling=d["sampling"],
                      fmt=OutputFormat(kind=f.get("kind", "text"), schema=f.get("schema"), grammar=f.get("grammar")),
                      max_input_tokens=d.get("max_input_tokens"))


def reply_to_wire(rep: "LLMReply | BaseException") -> dict[str, Any]:
    """A reply, a ``PromptTooLongError`` or another per-request exception -> a JSON-able dict."""
    if isinstance(rep, PromptTooLongError):
        return {"too_long": rep.tokens, "limit": rep.limit, "what": rep.what}
    if isinstance(rep, BaseException):
        return {"error": error_text(rep)}
    return {"text": rep.text, "finish_reason": rep.finish_reason, "prompt_tokens": int(rep.prompt_tokens or 0),
            "completion_tokens": int(rep.completion_tokens or 0)}


def reply_from_wire(d: dict[str, Any]) -> "LLMReply | BaseException":
    """The stage side of ``reply_to_wire``: an ``LLMReply``, a ``PromptTooLongError`` or an
    ``EngineError``."""
    if "too_long" in d:
        return PromptTooLongError(d["too_long"], d["limit"], d.get("what") or "the limit")
    if "error" in d:
        return EngineError(d["error"])
    return LLMReply(text=d["text"], finish_reason=d.get("finish_reason"), prompt_tokens=int(d.get("prompt_tokens") or 0),
                    completion_tokens=int(d.get("completion_tokens") or 0))


class LLMEngine(Protocol):
    """What a backend provides to ``LLMStage``."""

    #: whether a reply that failed validation can be re-asked (False for batch-file results)
    can_repair: bool

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """One reply (or the exception that prevented it) per request, in request order."""

    def describe_error(self, exc: BaseException) -> str:
        """``"ExceptionType: message"`` for ``ROW_ERROR``, with secrets removed."""

    def is_transient(self, exc: BaseException) -> bool:
        """True when ``exc`` (raised by ``generate`` as a whole) may pass on a retry: the stage
        then re-raises it so the runtime retries the rows (``jobs.core.runtime``)."""


def describe_error(exc: BaseException) -> str:
    """Default ``ROW_ERROR`` text: ``"ExceptionType: message"``; an engine's own text as is."""
    return str(exc) if isinstance(exc, EngineError) else error_text(exc)


def row_inputs(row_id: str, messages: Any, sampling: Any, params: "LLMParams",
               response_format: Callable[[], OutputFormat]) -> tuple[list[dict], "Sampling", OutputFormat]:
    """One row's normalized LLM inputs: chat messages (with the stage's system prompt), its
    sampling parameters and its output format (``response_format()`` is called last).
    Raises ``rows.InputError`` naming the row and the field that is invalid."""
    field = "messages"
    try:
        msgs = with_system_prompt(normalize_messages(messages), params.system_prompt)
        field = "sampling"
        samp = params.sampling(normalize_sampling(sampling))
        field = "response_format"
        return msgs, samp, response_format()
    except Exception as e:  # noqa: BLE001 - any failure is this row's invalid input
        raise rows.InputError(row_id, field, str(e)) from None


class ImageInliner:
    """Turns image references in chat messages into bounded base64 data URLs, once per image.

    Rows keep images as paths/URIs (``{"type": "image_url", "image_url": {"url": "s3://..."}}``);
    API backends need the bytes inline. Each distinct reference is read, shrunk to at most
    ``max_side`` px on its longer side and encoded (PNG or JPEG, whichever is smaller with
    ``image_format="auto"``) **once per actor** (LRU cache of ``cache_size`` entries), so an
    in-context example image shared by many prompts is not re-encoded for each of them (the
    original MM-GEN re-encoded full-size JPEGs in every request, SPEC D9.9). ``data:`` and
    ``http(s)://`` URLs are passed through unchanged.

    Model-spec options read by ``from_options``: ``image_max_side`` (int px, default 1024),
    ``image_format`` (``auto``/``png``/``jpeg``), ``jpeg_quality`` (default 90).
    """

    def __init__(self, max_side: int = 1024, image_format: str = "auto", jpeg_quality: int = 90,
                 cache_size: int = 512):
        import threading
        from collections import OrderedDict

        if image_format not in ("auto", "png", "jpeg"):
            raise ValueError(f"image_format must be auto, png or jpeg, got {image_format!r}")
        self.max_side, self.image_format, self.jpeg_quality = int(max_side), image_format, int(jpeg_quality)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, Any] = {}
        #: number of images read and encoded (cache misses); the actor's threads never encode one twice
        self.encoded = 0

    def _encode(self, ref: str) -> str:
        """Cached, thread-safe: concurrent requests for one image wait for a single encoding."""
        import threading

        from udfs.images import image_data_url

        with self._lock:
            if ref in self._cache:
                self._cache.move_to_end(ref)
                return self._cache[ref]
            key_lock = self._key_locks.setdefault(ref, threading.Lock())
        with key_lock:
            with self._lock:
                if ref in self._cache:
                    return self._cache[ref]
            url = image_data_url(ref, "?", "messages", self.max_side, self.image_format, self.jpeg_quality)
            with self._lock:
                self._cache[ref] = url
                self.encoded += 1
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                self._key_locks.pop(ref, None)
            return url

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "ImageInliner":
        """An inliner configured from a model spec's ``options``."""
        return cls(int(options.get("image_max_side", 1024)), options.get("image_format", "auto"),
                   int(options.get("jpeg_quality", 90)))

    def url(self, ref: str, row_id: str | None = None) -> str:
        """Data URL for one reference. Raises ``rows.InputError`` naming the row and the
        ``messages`` field when the image cannot be read or decoded."""
        if ref.startswith(("data:", "http://", "https://")):
            return ref
        try:
            return self._encode(ref)
        except rows.InputError as e:
            raise rows.InputError(row_id or "?", "messages", e.problem) from None

    def __call__(self, messages: list[dict[str, Any]], row_id: str | None = None) -> list[dict[str, Any]]:
        """Copy of ``messages`` with every image reference inlined (see ``url``)."""
        from udfs.llm_output import map_image_urls

        return map_image_urls(messages, lambda u: self.url(u, row_id))
