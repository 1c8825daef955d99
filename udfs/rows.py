"""Row contract shared by every stage: ids, statuses, error/reject records, seeds.

Every pipeline is one Ray Data dataset. Rows never leave it silently: a row that a filter
rejects or a stage fails on stays in the dataset with ``_status`` set to ``rejected`` or
``error``; later stages pass such rows through untouched, and the writer splits the final
table into the main outputs, ``rejects/`` and ``errors/``. This keeps the funnel exact
(rows in = out + rejected + errored for every stage) without branching the dataset.

A stage function (task UDF or model actor) receives a batch ``dict[str, np.ndarray]`` of
*ok* rows only and returns the same dict with new columns. To fail or reject single rows
without raising, it may add the optional columns ``ROW_ERROR`` / ``ROW_REJECT``: one entry
per row, ``None`` for rows that are fine, otherwise the message. Exceptions raised for a
whole batch are isolated to the offending rows by the runtime (``jobs.core.runtime``).
An LLM stage in Batch API mode may add ``ROW_WAITING`` (a note, None for rows it answered): such
a row gets ``_status`` ``waiting``; it is not final, so the driver never commits it and the next
run processes it again (``jobs.core.batches``).
"""
from __future__ import annotations

import hashlib
import json
import traceback

ID = "id"
STATUS = "_status"
OK, REJECTED, ERROR = "ok", "rejected", "error"
#: a row whose model call was put into a Batch API request file and has no reply yet: not final,
#: never committed (the next run computes it again), passed through later stages like an error
WAITING = "waiting"
STAGE = "_stage"          # name of the stage that rejected or failed the row
REASON = "_reason"        # reject reason, or the JSON error record for errors
PLACEHOLDER = "_placeholder"  # comma-separated stage names whose model was a placeholder
AUDIT = "_audit"          # comma-separated "stage:reason" verdicts a filter in audit mode did not apply
ROW_ERROR = "__row_error__"    # optional per-row error messages returned by a stage function
ROW_REJECT = "__row_reject__"  # optional per-row reject reasons returned by a stage function
ROW_WAITING = "__row_waiting__"  # optional per-row "call spooled for the Batch API" notes (``WAITING``)

CONTROL_COLUMNS = (STATUS, STAGE, REASON, PLACEHOLDER, AUDIT)


def content_id(*parts: str, length: int = 16) -> str:
    """Stable id of a piece of content: hex SHA-256 of the parts joined by ``\\x1f``.

    Used when a source row has no id of its own (e.g. a caption without a key).
    """
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return h[:length]


def seed_from_id(row_id: str, salt: str = "") -> int:
    """Deterministic 31-bit seed derived from a row id (and an optional salt, e.g. attempt).

    Seeds come from the row, not from a shared generator, so one row can be regenerated
    alone and a rerun reproduces the same images.
    """
    digest = hashlib.sha256(f"{row_id}\x1f{salt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def error_record(stage: str, exc: BaseException | str, attempt: int = 1) -> str:
    """JSON error record stored in ``REASON`` of an errored row.

    Keys: ``stage``, ``type`` (exception class name), ``message``, ``attempt``; plus
    ``traceback`` (last lines) when an exception object is given.
    """
    if isinstance(exc, BaseException):
        rec = {"stage": stage, "type": type(exc).__name__, "message": str(exc), "attempt": attempt,
               "traceback": "".join(traceback.format_exception(exc)[-3:])[-2000:]}
    else:
        kind, _, msg = str(exc).partition(": ")
        rec = {"stage": stage, "type": kind if msg else "RowError", "message": msg or str(exc),
               "attempt": attempt}
    return json.dumps(rec)


class InputError(ValueError):
    """Invalid input for one row (missing file, corrupt image, malformed JSON/CSV).

    The message must name the row id and the field, e.g.
    ``row 'abc' field 'image': cannot decode /data/x.jpg (truncated file)``.
    """

    def __init__(self, row_id: str, field: str, problem: str):
        super().__init__(f"row {row_id!r} field {field!r}: {problem}")
        self.row_id, self.field, self.problem = row_id, field, problem


class StopRun(Exception):
    """Raised by a stage when the whole run must stop now (e.g. its spend budget is used up):
    the runtime never turns it into a row error; it ends the Ray Data execution, and the rows
    already committed stay (a rerun resumes after them)."""
