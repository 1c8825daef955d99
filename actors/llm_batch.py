"""OpenAI Batch API request and result files (MIRROR's original way of running its screenplays).

Two ways to use them:

- **Round trip** (``--batch``, ``jobs.core.batches``): an ``LLMStage`` in batch mode spools each
  call that the generation cache cannot answer with ``BatchSpool`` (one request line per call,
  ``custom_id`` = the call's cache key, body = ``chat_body``); the driver uploads the spooled
  lines and creates the batches; ``result_entries`` turns the provider's output/error lines into
  cache entries and failures, so the next run answers those calls from the cache.
- **Manual files** (backend ``openai_batch``, kept for existing recipes), two invocations:

1. ``write_batch_requests(rows, model, params, out_uri)`` writes request files
   (``requests-00000.jsonl``, ...; each line ``{"custom_id": <row id>, "method": "POST",
   "url": "/v1/chat/completions", "body": {...}}``), at most 50,000 requests and ~190 MB per
   file (the Batch API's limits). The user submits them to the provider.
2. The provider's output files (each line ``{"id", "custom_id", "response": {"status_code",
   "request_id", "body": <chat completion>}, "error": null | {"code", "message"}}``) are
   read by ``read_batch_results`` or by ``LLMStage`` with backend ``openai_batch`` and
   ``options.results`` = their URIs; rows are joined on ``custom_id`` = ``id``, so the order
   of the result lines does not matter.

Files are read/written through ``udfs.io`` (local paths or ``s3://``).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from actors.llm_base import ImageInliner, LLMParams, LLMReply, LLMRequest, describe_error, row_inputs
from actors.llm_openai import chat_body
from actors.models import ModelSpec, ResolvedModel, resolve
from udfs import io, rows
from udfs.llm_output import parse_response_format

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 190 * 1024 * 1024
CHAT_URL = "/v1/chat/completions"


class BatchResultError(RuntimeError):
    """The provider reported an error for this request (error line or non-200 status)."""


class MissingBatchResult(LookupError):
    """No result line carries this row's id."""


def _resolved(model: ResolvedModel | ModelSpec | dict) -> ResolvedModel:
    if isinstance(model, ResolvedModel):
        return model
    if isinstance(model, dict) and "spec" in model:
        return ResolvedModel.model_validate(model)
    return resolve(model)


def batch_request_lines(rows_in: Iterable[dict[str, Any]], model: ResolvedModel | ModelSpec | dict,
                        params: LLMParams | dict | None = None) -> Iterable[dict[str, Any]]:
    """Yield one Batch API request dict per row (see ``write_batch_requests``)."""
    resolved = _resolved(model)
    p = params if isinstance(params, LLMParams) else LLMParams.model_validate(params or {})
    default_fmt = p.output_format()
    inline = ImageInliner.from_options(resolved.spec.options)  # image paths -> bounded data URLs, once each
    seen: set[str] = set()
    for n, row in enumerate(rows_in):
        rid = row.get(rows.ID)
        if rid is None or str(rid) == "":
            raise rows.InputError(f"#{n}", rows.ID, "a batch request needs a row id (custom_id)")
        rid = str(rid)
        if rid in seen:
            raise rows.InputError(rid, rows.ID, "duplicate id: custom_id must be unique")
        seen.add(rid)
        msgs, samp, fmt = row_inputs(rid, row.get("messages"), row.get("sampling"), p,
                                     lambda: parse_response_format(row.get("response_format")) or default_fmt)
        body = chat_body(resolved.spec.model, inline(msgs, rid), samp, fmt, resolved.spec.options)
        yield {"custom_id": rid, "method": "POST", "url": CHAT_URL, "body": body}


def write_batch_requests(rows_in: Iterable[dict[str, Any]], model: ResolvedModel | ModelSpec | dict,
                         params: LLMParams | dict | None, out_uri: str, *,
                         max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
                         max_bytes_per_file: int = MAX_BYTES_PER_FILE) -> list[str]:
    """Write OpenAI Batch API request files for ``rows_in``; return their URIs in order.

    ``rows_in``: dicts with ``id`` (becomes ``custom_id``), ``messages`` and optional
    ``sampling`` / ``response_format`` (as for ``LLMStage``). ``model``: a ``ResolvedModel``,
    its ``model_dump()``, or a model spec (``spec.model`` = API model name, options as for
    the ``openai`` backend: ``json_schema_mode`` etc.). ``params``: ``LLMParams`` or dict.
    ``out_uri``: folder (local or ``s3://``) receiving ``requests-00000.jsonl``, ...
    Bodies contain no ``None`` values. Raises ``rows.InputError`` naming the row and field for
    a missing/duplicate id or invalid messages/sampling/response_format (files completed
    before that row stay written; each is a valid batch on its own).
    """
    uris: list[str] = []
    lines: list[str] = []
    size = 0

    def flush():
        nonlocal lines, size
        if lines:
            uri = io.join(out_uri, f"requests-{len(uris):05d}.jsonl")
            io.write_text(uri, "".join(lines))
            uris.append(uri)
            lines, size = [], 0

    for req in batch_request_lines(rows_in, model, params):
        line = json.dumps(req, ensure_ascii=False) + "\n"
        nbytes = len(line.encode("utf-8"))
        if lines and (len(lines) >= max_requests_per_file or size + nbytes > max_bytes_per_file):
            flush()
        lines.append(line)
        size += nbytes
    flush()
    return uris


def _result_record(line: dict[str, Any]) -> dict[str, Any]:
    rec = {"generated_text": None, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
           "error": None}
    err = line.get("error")
    response = line.get("response") or {}
    if err:
        if isinstance(err, dict):
            rec["error"] = f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
        else:
            rec["error"] = str(err)
        return rec
    status = response.get("status_code", 200)
    body = response.get("body") or {}
    if status != 200:
        msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        rec["error"] = f"HTTP {status}: {msg or json.dumps(body)[:500]}"
        return rec
    choices = body.get("choices") or []
    if not choices:
        rec["error"] = "response has no choices"
        return rec
    usage = body.get("usage") or {}
    rec.update(generated_text=(choices[0].get("message") or {}).get("content") or "",
               finish_reason=choices[0].get("finish_reason"),
               prompt_tokens=int(usage.get("prompt_tokens") or 0),
               completion_tokens=int(usage.get("completion_tokens") or 0))
    return rec


def result_entries(line: dict[str, Any], model: str, batch_id: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """One provider result line (output or error file) as ``(custom_id, cache entry, failure)``.

    A success gives the entry ``LLMStage`` stores for a reply (``text``, ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens``, ``model``) plus ``batch_id``, and failure None; an
    error line or a non-200 response gives entry None and the provider's message
    (``"code: message"`` / ``"HTTP <status>: message"``). Raises ``ValueError`` without
    ``custom_id``."""
    cid = line.get("custom_id") if isinstance(line, dict) else None
    if cid is None:
        raise ValueError("result line has no custom_id")
    rec = _result_record(line)
    if rec["error"] is not None:
        return str(cid), None, rec["error"]
    return str(cid), {"text": rec["generated_text"], "finish_reason": rec["finish_reason"],
                      "prompt_tokens": rec["prompt_tokens"], "completion_tokens": rec["completion_tokens"],
                      "model": model, "batch_id": batch_id}, None


def read_failures(uri: str | None) -> dict[str, str]:
    """``{custom_id: provider message}`` from the ``*.jsonl`` files (lines ``{"key", "message"}``)
    under ``uri`` (a folder; None or absent: empty)."""
    out: dict[str, str] = {}
    if not uri or not io.exists(uri):
        return out
    for f in io.list_files(uri, ".jsonl"):
        for raw in io.read_text(f).splitlines():
            if raw.strip():
                rec = json.loads(raw)
                out[str(rec["key"])] = str(rec["message"])
    return out


class BatchSpool:
    """Where a batch-mode ``LLMStage`` puts the calls it does not send.

    ``BatchSpool(uri, stage, options)``: ``uri`` is the stage's spool folder
    (``OUT/_work/batches/spool/<stage>``), ``options`` the model spec's options (``chat_body``
    settings and ``ImageInliner`` limits). ``request(key, model, req)`` returns the Batch API
    request line of a call (``custom_id`` = ``key``; raises what ``ImageInliner`` raises for an
    unreadable image); ``write(entries)`` writes one JSONL file of ``{"key", "row_id", "stage",
    "request"}`` records under a unique name (one file per stage batch, so workers never share a
    file) and returns its URI (None for no entries)."""

    def __init__(self, uri: str, stage: str, options: dict[str, Any]):
        self.uri, self.stage, self.options = uri, stage, dict(options)
        self.inline = ImageInliner.from_options(self.options)

    def request(self, key: str, model: str, req: LLMRequest) -> dict[str, Any]:
        """The request line of one call (see the class docstring)."""
        body = chat_body(model, self.inline(req.messages, req.row_id), req.sampling, req.fmt, self.options)
        return {"custom_id": key, "method": "POST", "url": CHAT_URL, "body": body}

    def write(self, entries: list[tuple[str, str | None, dict[str, Any]]]) -> str | None:
        """Write ``(key, row id, request line)`` entries as one spool file; returns its URI."""
        if not entries:
            return None
        uri = io.join(self.uri, f"{uuid.uuid4().hex}.jsonl")
        io.write_text(uri, "".join(json.dumps({"key": k, "row_id": rid, "stage": self.stage, "request": r},
                                              ensure_ascii=False) + "\n" for k, rid, r in entries))
        return uri


def _expand(uris: str | Iterable[str]) -> list[str]:
    out = []
    for uri in [uris] if isinstance(uris, str) else list(uris):
        if io.exists(uri) and not uri.endswith(".jsonl"):
            files = io.list_files(uri, ".jsonl")
            out.extend(files if files else [uri])
        else:
            out.append(uri)
    return out


def read_batch_results(result_uris: str | Iterable[str]) -> dict[str, dict[str, Any]]:
    """Read provider result files into ``{custom_id: {generated_text, finish_reason,
    prompt_tokens, completion_tokens, error}}``.

    ``result_uris``: one URI or several (files, or folders whose ``*.jsonl`` are read).
    ``error`` is None for successes, else ``"code: message"`` (error lines) or
    ``"HTTP <status>: message"``; ``generated_text`` is then None. When an id appears more
    than once, a success wins over an error and a later success over an earlier one.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a line that is not
    JSON or has no ``custom_id`` (naming file and line number).
    """
    results: dict[str, dict[str, Any]] = {}
    for uri in _expand(result_uris):
        for lineno, raw in enumerate(io.read_text(uri).splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri}:{lineno}: not JSON ({e.msg})") from None
            cid = line.get("custom_id") if isinstance(line, dict) else None
            if cid is None:
                raise ValueError(f"{uri}:{lineno}: result line has no custom_id")
            rec = _result_record(line)
            old = results.get(str(cid))
            if old is None or rec["error"] is None or old["error"] is not None:
                results[str(cid)] = rec
    return results


class BatchResultsEngine:
    """``LLMStage`` engine for ``openai_batch``: fills rows from provider result files.

    ``options.results``: URI or list of URIs (required). No repair is possible: an invalid
    reply is rejected. Rows without a result → ``MissingBatchResult`` ("missing from batch
    results"); provider errors → ``BatchResultError``. Raises ``ValueError`` without
    ``options.results``.
    """

    can_repair = False

    def __init__(self, resolved: ResolvedModel, params: LLMParams):
        uris = resolved.spec.options.get("results")
        if not uris:
            raise ValueError("backend openai_batch needs options.results (provider result file URIs); "
                             "write requests with actors.llm.write_batch_requests first")
        self.results = read_batch_results(uris)

    def describe_error(self, exc: BaseException) -> str:
        """``"ExceptionType: message"``."""
        return describe_error(exc)

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """Look up each request's row id in the results."""
        out: list[LLMReply | BaseException] = []
        for req in requests:
            rec = self.results.get(req.row_id) if req.row_id is not None else None
            if rec is None:
                out.append(MissingBatchResult(f"row {req.row_id!r} missing from batch results"))
            elif rec["error"]:
                out.append(BatchResultError(rec["error"]))
            else:
                out.append(LLMReply(text=rec["generated_text"], finish_reason=rec["finish_reason"],
                                    prompt_tokens=rec["prompt_tokens"], completion_tokens=rec["completion_tokens"]))
        return out
