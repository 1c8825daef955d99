"""LLM request and reply handling shared by every LLM backend (pure functions, no Ray, no model).

Three concerns:

- **Requests**: a ``messages`` cell coming out of Ray Data can be a JSON string, a list of
  dicts, or a numpy object array of dicts whose nested lists are numpy arrays too, and Arrow
  adds ``None`` for struct fields a row does not have (``"image_url": None`` on text parts).
  ``normalize_messages`` turns any of these into plain OpenAI chat messages with no ``None``
  values; ``strip_nones`` does the same for any request body.
- **Output formats**: ``OutputFormat`` says what a reply must look like: free text, any
  JSON object, JSON matching a schema (a pydantic model or a JSON-schema dict), text
  full-matching a regex, or text produced under an EBNF grammar. ``OutputFormat.validate``
  parses and checks one reply and raises ``OutputValidationError`` with a readable reason.
- **Repair**: ``repair_messages`` builds the re-ask conversation: the original messages, the
  faulty reply as the assistant turn, and a user turn giving the validation error and asking
  for the corrected output only. Every repair turn starts with ``REPAIR_MARKER``.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

#: first words of every repair turn (lets servers and tests recognise a re-ask)
REPAIR_MARKER = "Your previous reply was not valid."

#: sampling keys accepted in LLMParams and in a row's ``sampling`` override
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "seed")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)(?:\r?\n)?[ \t]*```", re.DOTALL)
_MAX_REASON = 1500


class OutputParseError(ValueError):
    """A reply that should hold JSON holds no parsable JSON value."""


class OutputValidationError(ValueError):
    """A reply that does not match its ``OutputFormat`` (parse or schema/regex failure)."""


class MessagesError(ValueError):
    """A ``messages`` cell that is not a valid list of OpenAI chat messages."""


# --------------------------------------------------------------------------- requests

def to_python(obj: Any) -> Any:
    """Recursively convert numpy containers and scalars into plain Python objects.

    ``np.ndarray`` → list, numpy scalars → ``int``/``float``/``bool``/``str``, mappings →
    ``dict`` (keys kept), tuples → lists. Other objects are returned unchanged.
    """
    if isinstance(obj, np.ndarray):
        return [to_python(x) for x in obj.tolist()] if obj.dtype == object else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_python(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_python(x) for x in obj]
    return obj


def strip_nones(obj: Any) -> Any:
    """Return a copy of ``obj`` with every ``None``-valued dict key removed, recursively.

    Lists keep their length (a ``None`` list item stays, it is data, not an Arrow artefact).
    Used on request bodies before they are sent: Arrow round-trips add ``"image_url": None``,
    ``"maxLength": None`` and the like, which strict servers reject.
    """
    if isinstance(obj, dict):
        return {k: strip_nones(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [strip_nones(v) for v in obj]
    return obj


def normalize_messages(cell: Any) -> list[dict[str, Any]]:
    """Turn a ``messages`` cell into a plain list of OpenAI chat messages.

    Accepts a JSON string, a list/tuple of dicts, or a numpy object array of dicts (Ray Data
    numpy batches), with nested numpy arrays anywhere. ``None`` values are removed
    (``strip_nones``). Each message must be a dict with a string ``role`` and a ``content``
    that is a string, a non-empty list of content parts (dicts with a ``type``), or absent
    (only for assistant messages). Raises ``MessagesError`` otherwise.

    Arrow cannot hold string and list contents in one column: pipelines whose rows mix both
    should store ``messages`` as JSON strings.
    """
    if isinstance(cell, (bytes, bytearray)):
        cell = cell.decode("utf-8")
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise MessagesError(f"messages is not valid JSON: {e}") from None
    if cell is None:
        raise MessagesError("messages is missing (None)")
    msgs = strip_nones(to_python(cell))
    if isinstance(msgs, dict):
        msgs = [msgs]
    if not isinstance(msgs, list) or not msgs:
        raise MessagesError(f"messages must be a non-empty list of dicts, got {type(msgs).__name__}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise MessagesError(f"message {i} is a {type(m).__name__}, not a dict")
        if not isinstance(m.get("role"), str):
            raise MessagesError(f"message {i} has no string 'role'")
        content = m.get("content")
        if content is None:
            if m["role"] != "assistant":
                raise MessagesError(f"message {i} (role {m['role']!r}) has no content")
        elif isinstance(content, list):
            if not content or not all(isinstance(p, dict) and "type" in p for p in content):
                raise MessagesError(f"message {i} content must be a string or a list of typed parts")
        elif not isinstance(content, str):
            raise MessagesError(f"message {i} content is a {type(content).__name__}")
    return msgs


def text_only_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten list contents into strings for text-only chat templates.

    Text parts are concatenated in order. Raises ``MessagesError`` if a message holds a
    non-text part (an image sent to a text-only model must fail loudly, not be dropped).
    """
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            kinds = {p.get("type") for p in content} - {"text"}
            if kinds:
                raise MessagesError(f"message {i} has {sorted(kinds)} parts; this backend is text-only")
            m = {**m, "content": "".join(p.get("text", "") for p in content)}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


def image_url_of(part: dict[str, Any]) -> str | None:
    """The image reference of an OpenAI content part, or ``None`` for non-image parts.

    ``{"type": "image_url", "image_url": {"url": U}}`` (or ``"image_url": U``) gives ``U``: a
    ``data:`` URL, an ``http(s)://`` URL, or a path / ``file://`` / ``s3://`` URI of an image
    that the sending stage reads itself (pipelines keep paths in their rows and let the LLM
    stage encode each image once, instead of storing base64 in every row).
    """
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    ref = part.get("image_url")
    if isinstance(ref, dict):
        ref = ref.get("url")
    return ref if isinstance(ref, str) and ref else None


def count_images(messages: list[dict[str, Any]]) -> int:
    """Number of image parts in chat ``messages``."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if image_url_of(p) is not None)


def map_image_urls(messages: list[dict[str, Any]], fn) -> list[dict[str, Any]]:
    """Copy of ``messages`` with every image part's URL replaced by ``fn(url)`` (e.g. a path
    turned into a bounded base64 data URL). Text parts and string contents are unchanged."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                url = image_url_of(p)
                parts.append(p if url is None else {"type": "image_url", "image_url": {**(
                    p["image_url"] if isinstance(p.get("image_url"), dict) else {}), "url": fn(url)}})
            m = {**m, "content": parts}
        out.append(m)
    return out


def multimodal_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages → (Hugging Face chat-template messages, image references in order).

    Image parts become ``{"type": "image"}`` (what processors' chat templates expand into
    their image tokens), text parts stay ``{"type": "text", "text": ...}``, string contents
    stay strings. Raises ``MessagesError`` for a part type other than text / image_url.
    """
    refs: list[str] = []
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                url = image_url_of(p)
                if url is not None:
                    refs.append(url)
                    parts.append({"type": "image"})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text", "")})
                else:
                    raise MessagesError(f"message {i} has an unsupported {p.get('type')!r} part")
            m = {**m, "content": parts}
        elif content is None:
            m = {**m, "content": ""}
        out.append(m)
    return out, refs


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """Prepend ``system_prompt`` as a system message unless the messages already start with one."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _json_cell(cell: Any, what: str) -> Any:
    """A per-row JSON override cell as plain Python with Arrow's ``None`` values dropped;
    ``None`` for an empty cell. Raises ``ValueError`` naming ``what`` on invalid JSON."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return None
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    return strip_nones(to_python(cell))


def normalize_sampling(cell: Any) -> dict[str, Any]:
    """Parse a row's ``sampling`` override into a dict of known sampling keys.

    ``cell``: ``None``/empty (→ ``{}``), a JSON string or a dict; ``None`` values are dropped
    (Arrow struct artefacts). Raises ``ValueError`` on invalid JSON, a non-object, or a key
    not in ``SAMPLING_KEYS``.
    """
    cell = _json_cell(cell, "sampling")
    if cell is None:
        return {}
    if not isinstance(cell, dict):
        raise ValueError(f"sampling must be a JSON object, got {type(cell).__name__}")
    unknown = sorted(set(cell) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling keys {unknown}; allowed: {list(SAMPLING_KEYS)}")
    return cell


# --------------------------------------------------------------------------- parsing

def strip_code_fences(text: str) -> str:
    """Return the content of the first fenced code block (```` ```json ... ``` ````), else ``text``.

    Leading/trailing whitespace is removed. An opening fence without a closing one (a
    truncated reply) is removed too.
    """
    if text is None:
        return ""
    m = _FENCE.search(text)
    if m:
        return m.group(2).strip()
    s = text.strip()
    if s.startswith("```"):
        s = s.split("\n", 1)[1] if "\n" in s else ""
    return s.strip()


def extract_json(text: str) -> Any:
    """Parse the JSON value in an LLM reply.

    Order: code fences stripped, then the whole text with ``json.loads(strict=False)`` (raw
    control characters inside strings allowed: constrained decoders let them through), then
    the first ``{``/``[`` from which a complete JSON value decodes (prose around it ignored).
    Raises ``OutputParseError`` naming the first decoding error.
    """
    s = strip_code_fences(text)
    try:
        return json.loads(s, strict=False)
    except json.JSONDecodeError as e:
        first_error = e
    dec = json.JSONDecoder(strict=False)
    for m in re.finditer(r"[\[{]", s):
        try:
            value, _ = dec.raw_decode(s, m.start())
            return value
        except json.JSONDecodeError:
            continue
    raise OutputParseError(f"no JSON value found ({first_error.msg} at line {first_error.lineno} "
                           f"column {first_error.colno})")


# --------------------------------------------------------------------------- formats

def import_object(path: str) -> Any:
    """Import ``"package.module:Attr"`` (or ``"package.module.Attr"``). Raises ``ImportError``."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{path!r} is not an import path of the form 'module:Name'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _is_pydantic_model(obj: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, type) and issubclass(obj, BaseModel)


@dataclass(frozen=True, eq=False)
class OutputFormat:
    """What a reply must look like, and how to check it.

    ``kind``:
      - ``text``: anything (no parsing);
      - ``json_object``: any JSON value (parsed, not schema-checked);
      - ``json_schema``: JSON validated against ``schema`` (a JSON-schema dict), or against
        ``model`` (a pydantic class; ``schema`` is then its ``model_json_schema()``);
      - ``regex``: the whole reply (stripped of one trailing newline) must ``re.fullmatch``
        ``grammar``;
      - ``ebnf``: produced under the EBNF ``grammar`` by a constraining decoder; accepted as
        produced (there is no EBNF checker on the Python side).
    """

    kind: Literal["text", "json_object", "json_schema", "regex", "ebnf"] = "text"
    schema: dict[str, Any] | None = None
    model: Any = None
    grammar: str | None = None
    name: str = "response"
    _validator: Any = field(default=None, repr=False, compare=False)

    @property
    def is_json(self) -> bool:
        """True for ``json_object`` and ``json_schema``: ``parsed`` is filled for this format."""
        return self.kind in ("json_object", "json_schema")

    @property
    def constrained(self) -> bool:
        """True when a decoder can enforce the format (everything but plain text)."""
        return self.kind != "text"

    def key(self) -> str:
        """Canonical string identifying the format (cache key for compiled grammars)."""
        if self.kind == "json_schema":
            return "json_schema:" + json.dumps(self.schema, sort_keys=True)
        return f"{self.kind}:{self.grammar or ''}"

    def validate(self, text: str) -> str | None:
        """Check one reply. Returns the validated object as a JSON string for JSON formats,
        ``None`` for text/regex/ebnf formats.

        For pydantic models the returned JSON is ``model_dump(mode="json", by_alias=True)``
        (field aliases such as ``no-exist`` kept). Raises ``OutputValidationError`` with the
        parse error, the schema violation (with its JSON path) or the regex mismatch.
        """
        text = "" if text is None else text
        if self.kind in ("text", "ebnf"):
            return None
        if self.kind == "regex":
            candidate = text[:-1] if text.endswith("\n") else text
            if re.fullmatch(self.grammar, candidate) is None:
                raise OutputValidationError(f"reply does not match the regular expression {self.grammar!r}")
            return None
        try:
            obj = extract_json(text)
        except OutputParseError as e:
            raise OutputValidationError(f"invalid JSON: {e}") from None
        if self.kind == "json_object":
            return json.dumps(obj, ensure_ascii=False)
        if self.model is not None:
            from pydantic import ValidationError

            try:
                inst = self.model.model_validate(obj)
            except ValidationError as e:
                errs = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                                 for err in e.errors()[:5])
                raise OutputValidationError(f"schema violation: {errs}"[:_MAX_REASON]) from None
            return json.dumps(inst.model_dump(mode="json", by_alias=True), ensure_ascii=False)
        validator = self._validator
        if validator is None:
            validator = _make_validator(self.schema)
            object.__setattr__(self, "_validator", validator)
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            import jsonschema

            best = jsonschema.exceptions.best_match(errors)
            path = "/".join(str(p) for p in best.absolute_path) or "<root>"
            raise OutputValidationError(f"schema violation at {path}: {best.message}"[:_MAX_REASON])
        return json.dumps(obj, ensure_ascii=False)

    def instruction(self) -> str | None:
        """Prompt text describing the format, for backends that cannot enforce it.

        ``None`` for ``text`` and ``ebnf``.
        """
        if self.kind == "json_schema":
            return ("Reply with a single JSON value and nothing else (no prose, no code fences). "
                    "It must conform to this JSON schema:\n" + json.dumps(self.schema, ensure_ascii=False))
        if self.kind == "json_object":
            return "Reply with a single JSON object and nothing else (no prose, no code fences)."
        if self.kind == "regex":
            return f"Reply with text that matches this regular expression exactly: {self.grammar}"
        return None


def _make_validator(schema: dict[str, Any]):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_from(spec: Any) -> tuple[dict[str, Any], Any, str]:
    """Resolve a response-schema spec into ``(json_schema, pydantic_model_or_None, name)``.

    ``spec``: a pydantic model class, an import path ``"module:Class"`` of one, a JSON-schema
    dict, a JSON string holding a schema, or an OpenAI ``response_format`` object
    (``{"type": "json_schema", "json_schema": {"name", "schema"}}``). ``None`` values left
    by Arrow are stripped from dict schemas. Raises ``ValueError`` (invalid schema or JSON)
    or ``ImportError`` (import path).
    """
    if _is_pydantic_model(spec):
        return spec.model_json_schema(), spec, spec.__name__
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("{"):
            try:
                spec = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"response schema is not valid JSON: {e}") from None
        else:
            obj = import_object(s)
            if not _is_pydantic_model(obj):
                raise ValueError(f"{s!r} is not a pydantic model class")
            return obj.model_json_schema(), obj, obj.__name__
    spec = strip_nones(to_python(spec))
    if not isinstance(spec, dict):
        raise ValueError(f"response schema must be a dict, got {type(spec).__name__}")
    name = "response"
    if spec.get("type") == "json_schema" and isinstance(spec.get("json_schema"), dict):
        name = spec["json_schema"].get("name", name)
        spec = spec["json_schema"].get("schema", {})
    try:
        _make_validator(spec)
    except Exception as e:  # jsonschema.SchemaError
        raise ValueError(f"invalid JSON schema: {getattr(e, 'message', e)}") from None
    return spec, None, name


def output_format(response_schema: Any = None, regex: str | None = None, ebnf: str | None = None) -> OutputFormat:
    """Build the ``OutputFormat`` of a stage from its parameters (at most one may be set).

    Raises ``ValueError`` when more than one is given, the regex does not compile, or the
    schema is invalid (see ``schema_from``).
    """
    given = [n for n, v in (("response_schema", response_schema), ("regex", regex), ("ebnf", ebnf))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are mutually exclusive")
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"invalid regex {regex!r}: {e}") from None
        return OutputFormat(kind="regex", grammar=regex)
    if ebnf is not None:
        return OutputFormat(kind="ebnf", grammar=ebnf)
    if response_schema is not None:
        if isinstance(response_schema, dict) and response_schema.get("type") == "json_object" \
                and "properties" not in response_schema and len(response_schema) == 1:
            return OutputFormat(kind="json_object")
        schema, model, name = schema_from(response_schema)
        return OutputFormat(kind="json_schema", schema=schema, model=model, name=name)
    return OutputFormat()


def parse_response_format(cell: Any) -> OutputFormat | None:
    """Per-row ``response_format`` column → ``OutputFormat``, or ``None`` when empty.

    ``cell``: a JSON-schema string/dict, an OpenAI ``response_format`` object
    (``{"type": "json_schema", ...}`` or ``{"type": "json_object"}``). Raises ``ValueError``.
    """
    cell = _json_cell(cell, "response_format")
    if not cell:
        return None
    return output_format(response_schema=cell)


# --------------------------------------------------------------------------- repair

def repair_messages(messages: list[dict[str, Any]], reply: str, error: str,
                    fmt: OutputFormat) -> list[dict[str, Any]]:
    """Conversation for one re-ask: ``messages`` + the faulty ``reply`` + a repair request.

    The repair turn starts with ``REPAIR_MARKER``, quotes the validation ``error``, restates
    the format (schema or regex) and asks for the corrected output only.
    """
    parts = [REPAIR_MARKER, f"Problem: {error}"]
    hint = fmt.instruction()
    if hint:
        parts.append(hint)
    parts.append("Reply again with the corrected output only: no explanation, no apology, no code fences.")
    return [*messages, {"role": "assistant", "content": reply or ""},
            {"role": "user", "content": "\n".join(parts)}]


def reject_reason(error: str, raw: str, attempts: int, limit: int = 2000) -> str:
    """Reject reason stored for a row whose reply never validated: error plus raw reply."""
    raw = raw or ""
    shown = raw if len(raw) <= limit else raw[:limit] + f"... [{len(raw) - limit} more chars]"
    return f"invalid LLM output after {attempts} attempt(s): {error}; raw output: {shown}"
