"""Batch API round trip (``--batch``): spool, submit, poll, ingest.

A run with ``--batch`` (recipe ``batch: true``) gives every LLM stage on an OpenAI-compatible
API (backend ``openai``) a spool (``actors.llm.LLMStage``, batch mode): a call the generation
cache cannot answer is written as a Batch API request line (``custom_id`` = the call's cache
key) and its row comes back ``waiting``. Waiting rows are not committed, so the next run
processes them again. After the Ray execution of a phase the driver calls ``submit``: the
spooled lines of each stage, without duplicate keys and without the keys already in a batch
that has not finished, are uploaded (``client.files.create(purpose="batch")``, split at
``MAX_REQUESTS_PER_FILE`` requests / ``MAX_BYTES_PER_FILE`` bytes) and each file becomes a
batch (``client.batches.create(endpoint="/v1/chat/completions", completion_window="24h")``).
Later phases wait until this one has no waiting row.

State, under ``OUT/_work/batches/``::

    <batch id>.json        the record of one batch (``BatchRecord`` keys below)
    requests/<stage>-<n>-<time>.jsonl   the request file as uploaded
    failures/<batch id>.jsonl  {"key", "message"}: calls the provider failed
    spool/<phase>/<stage>/*.jsonl  this run's spooled calls (cleared when a run starts)

``poll`` (``python -m jobs status OUT``, and every ``--batch`` run before it starts) retrieves
each batch not yet ingested; a batch in a final state (``completed``, ``expired``,
``cancelled``, ``failed``) is ingested: each successful output line becomes a generation-cache
entry under its ``custom_id`` (the entry ``LLMStage`` stores, plus ``batch_id``); each error line
or non-200 response is recorded in ``failures/``, and the next run turns that row into a row
error naming the provider's message. A ``failed`` batch (the provider refused the whole file)
records every request as failed with the batch's own errors. Requests with no result line at
all (an expired or cancelled batch) are recorded as ``missing`` and nothing else: the next run
spools them again, so nothing is lost.

Cost: a reply ingested from one of this output's batches is counted by ``LLMStage`` as a call
sent, not as a cache hit, so its tokens are billed; ``jobs.core.cost`` prices the ``openai``
stages of a ``--batch`` run at the recipe's batch prices (``batch_input_per_1m``/
``batch_output_per_1m``; without them the cost is unknown, never guessed). ``--max-cost`` is
refused with ``--batch``: the spend of a batch is known only after the provider ran it.

Every API call is bounded by the model spec's ``timeout_s`` (default 60 s). The module needs the
``openai`` package only when it talks to the API.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from actors.llm_batch import MAX_BYTES_PER_FILE, MAX_REQUESTS_PER_FILE, result_entries
from jobs.core.store import work
from udfs import io

#: batch states after which the provider changes nothing more
FINAL_STATES = frozenset({"completed", "expired", "cancelled", "failed"})
#: model-spec options the client needs (where and how to reach the API); never the key itself
CLIENT_OPTIONS = ("api_type", "base_url", "api_key_env", "azure_endpoint", "azure_endpoint_env", "api_version",
                  "api_version_env", "azure_deployment", "azure_ad_token_env", "timeout_s")
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"


def batches_dir(out: str, *parts: str) -> str:
    """``OUT/_work/batches/<parts>``."""
    return work(out, "batches", *parts)


def default_cache(out: str) -> str:
    """The generation cache of a ``--batch`` run that names none: ``OUT/_work/batch-cache``."""
    return work(out, "batch-cache")


def records(out: str) -> list[dict[str, Any]]:
    """Every batch record of ``out`` (``<id>.json`` under ``OUT/_work/batches``), oldest first.

    A record: ``id``, ``stage``, ``phase``, ``model``, ``client`` (``CLIENT_OPTIONS`` of the
    stage's spec), ``cache`` (URI the results go to), ``input_file_id``, ``request_file``,
    ``custom_ids`` (list of cache keys), ``requests`` (int), ``created_at`` (ISO time),
    ``status`` (the provider's), ``request_counts`` (``{"total", "completed", "failed"}`` as
    last polled), ``output_file_id``/``error_file_id``, ``ingested`` (bool), and once ingested
    ``succeeded``/``failed``/``missing`` (request counts by outcome)."""
    folder = batches_dir(out)
    if not io.exists(folder):
        return []
    recs = [json.loads(io.read_text(f)) for f in io.list_files(folder, ".json")]  # (.jsonl files are not records)
    return sorted(recs, key=lambda r: (r["created_at"], r["id"]))


def _save(out: str, rec: dict[str, Any]) -> None:
    io.write_text(batches_dir(out, f"{rec['id']}.json"), json.dumps(rec, indent=1))


def stage_config(out: str, phase: str, stage: str) -> dict[str, Any]:
    """The ``batch`` part of a batch-mode stage's cache config (``actors.llm.LLMStage``):
    ``{"spool", "stage", "batch_ids", "failures"}``."""
    return {"spool": batches_dir(out, "spool", phase, stage), "stage": stage,
            "batch_ids": [r["id"] for r in records(out) if r.get("ingested")],
            "failures": batches_dir(out, "failures")}


def clear_spool(out: str) -> None:
    """Remove the spool of an earlier run (its rows were never committed: they are run again)."""
    io.delete(batches_dir(out, "spool"))


def read_spool(out: str, phase: str) -> list[dict[str, Any]]:
    """This run's spooled calls of ``phase``: ``{"key", "row_id", "stage", "request"}`` dicts."""
    recs = []
    for f in io.list_files(batches_dir(out, "spool", phase), ".jsonl"):
        recs.extend(json.loads(x) for x in io.read_text(f).splitlines() if x.strip())
    return recs


def waiting_rows(spool: list[dict[str, Any]]) -> dict[str, str]:
    """``{row id: stage}`` of the rows whose call is spooled."""
    return {str(r["row_id"]): r["stage"] for r in spool if r.get("row_id") is not None}


def client(options: dict[str, Any]):
    """An ``openai`` client for a stage's ``CLIENT_OPTIONS`` (``actors.llm_openai.api_client``;
    Azure with ``api_type: azure``); each call times out after ``timeout_s`` (default 60) and
    is retried twice by the client (Azure: not retried). Raises ``ValueError`` when the API key
    variable is not set."""
    from actors.llm_openai import api_client

    return api_client(options, float(options.get("timeout_s", 60.0)), max_retries=2)[0]


def _chunks(lines: list[str], max_requests: int, max_bytes: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for line in lines:
        n = len(line.encode("utf-8"))
        if out[-1] and (len(out[-1]) >= max_requests or size + n > max_bytes):
            out.append([])
            size = 0
        out[-1].append(line)
        size += n
    return [c for c in out if c]


def submit(out: str, phase: str, spool: list[dict[str, Any]], stages: dict[str, Any], cache_uri: str, *,
           max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
           max_bytes_per_file: int = MAX_BYTES_PER_FILE) -> list[dict[str, Any]]:
    """Upload the spooled calls of ``phase`` and create their batches; returns the new records.

    ``stages``: stage name -> its ``ResolvedModel`` (model name and client options). Calls are
    grouped by stage; a key spooled twice (rows with identical requests) is sent once; a key
    already in a recorded batch that is not ingested yet is not sent again. Raises the
    client's errors (``openai.APIError``; records written before stay)."""
    pending = {k for r in records(out) if not r.get("ingested") for k in r["custom_ids"]}
    by_stage: dict[str, dict[str, dict]] = defaultdict(dict)
    for rec in spool:
        if rec["key"] not in pending:
            by_stage[rec["stage"]].setdefault(rec["key"], rec["request"])
    created = []
    for stage, reqs in sorted(by_stage.items()):
        resolved = stages[stage]
        opts = {k: v for k, v in resolved.spec.options.items() if k in CLIENT_OPTIONS}
        api = client(opts)
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in reqs.values()]
        for n, chunk in enumerate(_chunks(lines, max_requests_per_file, max_bytes_per_file)):
            data = "".join(chunk)
            name = f"{stage}-{n:03d}-{int(time.time() * 1000)}.jsonl"
            req_uri = io.join(batches_dir(out, "requests"), name)
            io.write_text(req_uri, data)
            f = api.files.create(file=(name, data.encode("utf-8"), "application/jsonl"), purpose="batch")
            b = api.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                                   metadata={"mmsynth_stage": stage, "mmsynth_phase": phase})
            rec = {"id": b.id, "stage": stage, "phase": phase, "model": resolved.spec.model, "client": opts,
                   "cache": cache_uri, "input_file_id": f.id, "request_file": req_uri,
                   "custom_ids": [json.loads(x)["custom_id"] for x in chunk], "requests": len(chunk),
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "status": b.status,
                   "request_counts": _counts(b), "output_file_id": None, "error_file_id": None, "ingested": False}
            _save(out, rec)
            created.append(rec)
    return created


def _counts(b) -> dict[str, int] | None:
    rc = getattr(b, "request_counts", None)
    return None if rc is None else {"total": rc.total, "completed": rc.completed, "failed": rc.failed}


def _file_lines(api, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    text = api.files.content(file_id).text
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _batch_errors(b) -> str:
    errs = getattr(getattr(b, "errors", None), "data", None) or []
    msgs = [f"{e.code or 'error'}: {e.message or ''}".strip() for e in errs]
    return "batch failed: " + ("; ".join(msgs) if msgs else "no reason given by the provider")


def ingest(out: str, rec: dict[str, Any], api, b) -> dict[str, Any]:
    """Ingest a batch in a final state (``b``: the provider's batch object): cache entries for
    its successes, ``failures/<id>.jsonl`` for its failed calls; marks the record ingested and
    returns it. Idempotent: a record already ingested is returned unchanged."""
    if rec.get("ingested"):
        return rec
    from actors.gen_cache import GenerationCache

    cache = GenerationCache(rec["cache"])
    ids = set(rec["custom_ids"])
    done: set[str] = set()
    failed: dict[str, str] = {}
    for line in _file_lines(api, rec.get("output_file_id")) + _file_lines(api, rec.get("error_file_id")):
        key, entry, failure = result_entries(line, rec["model"], rec["id"])
        if key not in ids or key in done:
            continue
        if entry is not None:
            cache.put(key, entry)
            done.add(key)
            failed.pop(key, None)
        else:
            failed.setdefault(key, failure)
    if rec["status"] == "failed" and not done and not failed:  # the provider refused the whole file
        failed = {k: _batch_errors(b) for k in rec["custom_ids"]}
    if failed:
        io.write_text(batches_dir(out, "failures", f"{rec['id']}.jsonl"),
                      "".join(json.dumps({"key": k, "message": m}) + "\n" for k, m in failed.items()))
    rec.update(ingested=True, succeeded=len(done), failed=len(failed), missing=len(ids - done - set(failed)))
    _save(out, rec)
    return rec


def poll(out: str) -> list[dict[str, Any]]:
    """Retrieve every batch of ``out`` not yet ingested, update its record and ingest it when
    it reached a final state (``FINAL_STATES``); returns all records (ingested ones as they
    were). Raises the client's errors (e.g. ``openai.APITimeoutError``)."""
    result = []
    clients: dict[str, Any] = {}
    for rec in records(out):
        if rec.get("ingested"):
            result.append(rec)
            continue
        ckey = json.dumps(rec["client"], sort_keys=True)
        api = clients.get(ckey) or clients.setdefault(ckey, client(rec["client"]))
        b = api.batches.retrieve(rec["id"])
        rec.update(status=b.status, request_counts=_counts(b), output_file_id=b.output_file_id,
                   error_file_id=b.error_file_id)
        _save(out, rec)
        if b.status in FINAL_STATES:
            rec = ingest(out, rec, api, b)
        result.append(rec)
    return result


def summary(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``manifest["batches"]``: each record without its key list and client options."""
    return [{k: v for k, v in r.items() if k not in ("custom_ids", "client")} for r in recs]


def describe(recs: list[dict[str, Any]]) -> str:
    """One line per batch: id, stage, status, request counts, and what was ingested."""
    lines = []
    for r in recs:
        rc = r.get("request_counts") or {}
        line = (f"  {r['id']:<28} {r['phase'] + ':' if r['phase'] != 'rows' else ''}{r['stage']:<18} {r['status']:<12} "
                f"{r['requests']} requests (completed {rc.get('completed', '-')}, failed {rc.get('failed', '-')})")
        if r.get("ingested"):
            line += f"; ingested: {r['succeeded']} answers, {r['failed']} failed, {r['missing']} to send again"
        lines.append(line)
    return "\n".join(lines)


def describe_waiting(waiting: dict[str, int]) -> str:
    """``manifest["waiting"]`` (``{stage: rows}``) as ``"3 at ask_name, 1 at ask_colour"``."""
    return ", ".join(f"{n} at {stage}" for stage, n in waiting.items())


def pending(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose batch has not been ingested yet."""
    return [r for r in recs if not r.get("ingested")]
