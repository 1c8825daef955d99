"""Per-stage statistics of a Ray Data execution, read from Ray Data's own statistics.

One table shape serves every run's manifest (``manifest["stage_stats"]``), the run report
and ``benchmarks/scale.py``. Source: ``Dataset.get_stats_summary()`` (a ``DatasetStatsSummary``
whose ``operators_stats`` hold the last operator of each executed plan, upstream ones under
``parents``); nothing is parsed from log text.
"""
from __future__ import annotations

import re

_MAP = re.compile(r"MapBatches\(([^()]+)\)")


def _stages(operator: str) -> list[str]:
    """Stage names of a (fused) operator ``MapBatches(a)->MapBatches(b)``; other operators
    (reads, writes, ``Union(MapBatches(a), ...)``) contain none."""
    return [m.group(1) for part in operator.split("->") if (m := _MAP.fullmatch(part))]


def _sum(s) -> float | None:
    return None if s is None else round(float(s.sum), 4)


def stage_table(ds, stages: list[str] | None = None) -> list[dict]:
    """Per-operator rows of an executed dataset ``ds``, upstream first.

    Each row: ``operator`` (Ray Data's name, fused operators joined by ``->``), ``stages``
    (the ``map_batches`` functions it contains, in order), ``rows`` (output rows), ``tasks``,
    ``wall_s`` (first task start to last task end, seconds; ``started``/``ended`` are those two
    instants, epoch seconds), ``rows_per_s`` (rows ÷
    ``wall_s``), ``task_wall_s``/``task_cpu_s`` (summed over tasks, seconds), ``udf_s``
    (summed time inside the user functions), ``nodes`` (distinct nodes that ran its tasks)
    and, when ``DataContext.per_stage_map_timing`` was on, ``stage_s``: seconds per fused
    stage (same order as ``stages``).

    ``stages``: when given, only operators containing one of these names are kept (the
    pipeline's own stages, not reads and writes). Returns ``[]`` when the dataset has not run.
    """
    try:
        summary = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - a dataset that never executed has no statistics
        return []
    levels = []

    def walk(s) -> None:
        for parent in getattr(s, "parents", None) or []:
            walk(parent)
        levels.append(s)
    walk(summary)
    table, seen = [], set()
    for level in levels:
        for op in level.operators_stats:
            names = _stages(op.operator_name)
            key = (op.operator_name, op.earliest_start_time)
            if key in seen or (stages is not None and not set(names) & set(stages)):
                continue
            seen.add(key)
            rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
            row = {
                "operator": op.operator_name,
                "stages": names,
                "rows": rows,
                "tasks": int(op.task_rows.count) if op.task_rows else 0,
                "wall_s": round(op.time_total_s or 0.0, 3),
                "rows_per_s": round(op.num_rows_per_s, 3),
                "task_wall_s": _sum(op.wall_time),
                "task_cpu_s": _sum(op.cpu_time),
                "udf_s": _sum(op.function_body_time),
                "nodes": int(op.node_count.count) if op.node_count else 0,
                "started": op.earliest_start_time,  # epoch seconds of the first task start
                "ended": op.latest_end_time,  # and of the last task end
            }
            if op.stage_time and len(op.stage_time) == len(names):
                row["stage_s"] = [round(float(s.sum), 4) for s in op.stage_time]
            table.append(row)
    return table


_recorded: list[dict] = []


def record(table: list[dict]) -> None:
    """Keep the per-stage table of a dataset a pipeline's ingest ran itself (MM-GEN's
    partition); the driver collects it with ``drain`` and adds it to the manifest."""
    _recorded.extend(table)


def drain() -> list[dict]:
    """The tables ``record``ed since the last call (and forget them)."""
    out = list(_recorded)
    _recorded.clear()
    return out


def by_stage(table: list[dict]) -> dict[str, dict]:
    """Per pipeline stage: its operator's figures from ``stage_table`` rows, plus
    ``fused_with`` (the other stages Ray fused into the same operator) and ``stage_s``
    (this stage's own seconds, when measured)."""
    out: dict[str, dict] = {}
    for row in table:
        for k, name in enumerate(row["stages"]):
            entry = {"operator": row["operator"], "wall_s": row["wall_s"], "rows_per_s": row["rows_per_s"],
                     "fused_with": [n for n in row["stages"] if n != name]}
            if "stage_s" in row:
                entry["stage_s"] = row["stage_s"][k]
            out[name] = entry
    return out
