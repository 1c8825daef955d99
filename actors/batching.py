"""Helpers shared by the vision model actors (text-to-image, detection, CLIP).

Batches arrive from Ray Data ``map_batches(batch_format="numpy")`` or from
``jobs.core.runtime`` as ``dict[str, np.ndarray]``: string columns are object arrays, list
columns object arrays whose cells are numpy arrays (Ray Data) or Python lists (runtime).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from udfs import rows

T = TypeVar("T")
R_ = TypeVar("R_")


def batch_len(batch: dict[str, Any]) -> int:
    """Number of rows in a batch (length of its ``id`` column, else of any column)."""
    if rows.ID in batch:
        return len(batch[rows.ID])
    for v in batch.values():
        return len(v)
    return 0


def row_ids(batch: dict[str, Any]) -> list[str]:
    """The ``id`` column as a list of ``str``. Raises ``KeyError`` when the batch has no ids."""
    if rows.ID not in batch:
        raise KeyError(f"batch has no {rows.ID!r} column (every row must carry a stable id)")
    return [str(x) for x in batch[rows.ID]]


def object_column(values: Sequence[Any]) -> np.ndarray:
    """1-D object array holding ``values`` as cells (lists stay lists, no broadcasting)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def is_missing(value: Any) -> bool:
    """True for ``None`` and float NaN (how Arrow/pandas nulls arrive)."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def cell_strings(value: Any, row_id: str, field: str) -> list[str]:
    """A list-of-strings cell as ``list[str]``.

    Accepts a list/tuple/numpy array of strings, ``None`` (-> ``[]``) or a JSON list string
    (``'["cat", "dog"]'``, e.g. from CSV input). Raises ``InputError`` for anything else.
    """
    if is_missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise rows.InputError(row_id, field, f"malformed JSON list {text[:80]!r}: {exc}") from None
        else:
            raise rows.InputError(row_id, field, f"expected a list of strings, got the string {text[:80]!r}")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise rows.InputError(row_id, field, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for v in value:
        if is_missing(v):
            continue
        if not isinstance(v, str):
            raise rows.InputError(row_id, field, f"list item {v!r} is not a string")
        out.append(v)
    return out


def error_text(exc: BaseException) -> str:
    """``"ExceptionType: message"``: the form of a ``rows.ROW_ERROR`` entry."""
    return f"{type(exc).__name__}: {exc}"


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (``torch.OutOfMemoryError``, or a
    ``RuntimeError`` whose message says "out of memory", as MPS/older CUDA builds raise)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_halving_on_oom(fn: Callable[[list[T]], list[R_]], items: list[T],
                       sizes: list[int] | None = None) -> list[R_ | BaseException]:
    """Call ``fn(items)``; on out-of-memory retry each half recursively.

    ``fn`` maps a list of items to one result per item. Returns one entry per item: its
    result, or the OOM exception when even a single item did not fit. Other exceptions
    propagate (the runtime isolates them per row). ``sizes``, if given, records every
    attempted call size (for tests and benchmarks).
    """
    if not items:
        return []
    if sizes is not None:
        sizes.append(len(items))
    try:
        out = fn(items)
    except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
        if not is_oom(exc):
            raise
        _free_accelerator_memory()
        if len(items) == 1:
            return [exc]
        mid = len(items) // 2
        return run_halving_on_oom(fn, items[:mid], sizes) + run_halving_on_oom(fn, items[mid:], sizes)
    if len(out) != len(items):
        raise RuntimeError(f"batched call returned {len(out)} results for {len(items)} items")
    return list(out)


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when given (tiny models on small CPUs run faster on 1 thread:
    NOTES identity-generation §6.5)."""
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))


def group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Positions grouped by key, in first-seen key order."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out
