"""An LLM stage whose rows may not need a call (MIRROR's record completion, issue 18 item 2).

``OptionalLLMStage`` has ``actors.llm.LLMStage``'s contract (same ``Params``, input and output
columns) and hands it only the rows whose ``messages`` cell holds messages. A row whose
``messages`` is null (None/NaN: the stage before decided there is nothing to ask, e.g. a full
Cactus row already has its distorted thought) makes no call and gets the outputs of a request
never sent: ``generated_text``/``parsed``/``finish_reason``/``llm_backend``/``llm_model`` None,
token counts and ``llm_attempts`` 0, ``llm_repaired`` False, no row error or reject. So a
stage's funnel and token totals count only the calls made.

It wraps ``LLMStage`` rather than extending it: whatever engine ``LLMStage(model, params)``
drives (a local model, an API client, a shared engine) serves the asked rows unchanged.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from actors.batching import is_missing, object_column
from actors.llm import OUTPUT_COLUMNS, LLMParams, LLMStage
from udfs import rows

__all__ = ["OptionalLLMStage", "SKIPPED_OUTPUTS"]

#: outputs of a row that made no call (``OUTPUT_COLUMNS`` keys)
SKIPPED_OUTPUTS: dict[str, Any] = {"generated_text": None, "parsed": None, "finish_reason": None,
                                   "prompt_tokens": 0, "completion_tokens": 0, "llm_backend": None,
                                   "llm_model": None, "llm_attempts": 0, "llm_repaired": False}
_INTS = ("prompt_tokens", "completion_tokens", "llm_attempts")


def _asked(cell: Any) -> bool:
    return not is_missing(cell) and not (isinstance(cell, str) and not cell.strip())


class OptionalLLMStage:
    """Ray Data actor (``map_batches``) with ``LLMStage``'s contract that skips rows without
    messages (module docstring).

    ``__init__(model, params)``: as ``LLMStage`` (``ResolvedModel.model_dump()`` and a dict of
    ``LLMParams``); loads the inner stage once. ``__call__(batch)``: a dict of numpy arrays with
    a ``messages`` column; returns every input column plus ``OUTPUT_COLUMNS``,
    ``rows.ROW_ERROR`` and ``rows.ROW_REJECT`` (one entry per row, in input order). Raises
    ``KeyError`` when ``messages`` is missing."""

    Params = LLMParams

    def __init__(self, model: dict, params: dict | None = None):
        self.inner = LLMStage(model, params)

    @classmethod
    def columns(cls, params: dict | None = None) -> tuple[list[str], list[str]]:
        """``LLMStage.columns``: ``(["id", "messages"], OUTPUT_COLUMNS)``."""
        return LLMStage.columns(params)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "messages" not in batch:
            raise KeyError(f"OptionalLLMStage needs a 'messages' column; got {sorted(batch)}")
        n = len(batch["messages"])
        asked = [i for i in range(n) if _asked(batch["messages"][i])]
        cols: dict[str, list] = {c: [SKIPPED_OUTPUTS[c]] * n for c in OUTPUT_COLUMNS}
        cols[rows.ROW_ERROR] = [None] * n
        cols[rows.ROW_REJECT] = [None] * n
        if asked:
            idx = np.asarray(asked, dtype=np.int64)
            got = self.inner({k: (v if isinstance(v, np.ndarray) else object_column(list(v)))[idx]
                              for k, v in batch.items()})
            for c in cols:
                values = list(got[c])
                for j, i in enumerate(asked):
                    cols[c][i] = values[j]
        out: dict[str, Any] = dict(batch)
        for c, values in cols.items():
            out[c] = np.asarray(values, dtype=np.int64) if c in _INTS else \
                np.asarray(values, dtype=bool) if c == "llm_repaired" else object_column(values)
        return out
