"""A run's funnel: per stage, rows in, out, rejected, errored (and waiting), with the sums of the
per-row token and cache columns; computed from the committed rows (``jobs.core.driver`` writes it
to the manifest and prints it, the report draws it). ``p`` arguments are ``jobs.core.driver.Plan``
objects (not imported here: the driver imports this module).
"""
from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc

from jobs.core.engines import is_llm_stage
from jobs.core.recipe import Recipe
from udfs import rows as R

#: per-row LLM stage columns (``actors.llm.LLMStage``) the funnel sums per stage
LLM_SUMS = ("prompt_tokens", "completion_tokens", "cache_hits", "cache_misses", "cached_prompt_tokens",
            "cached_completion_tokens")


def reached(rows: pa.Table, order: list[str], stage: str, through: bool = False) -> list[bool]:
    """Per row: did it enter ``stage`` (``through=True``: get through it)? A row is ok, or
    stopped (rejected/errored/waiting) at a stage of ``order``; rows stopped at ingest never enter."""
    pos = {s: k for k, s in enumerate(order)}
    k = pos[stage]
    return [st == R.OK or (pos.get(sg, -1) > k if through else pos.get(sg, -1) >= k)
            for st, sg in zip(rows.column(R.STATUS).to_pylist(), rows.column(R.STAGE).to_pylist())]


def funnel(p, rows: pa.Table, ingest_rejects: int, n_input: int, not_selected: int = 0,
           phase: str = "rows") -> list[dict]:
    """Per-stage counts: rows in = out + rejected + errored (+ ``waiting``: rows of a ``--batch``
    run whose call at this stage waits for a batch; only when ``rows`` holds waiting rows), computed
    from the committed rows (and the waiting rows the driver adds).

    The ingest row also counts ``not_selected`` (valid rows left out by ``--limit``). LLM
    stages add ``llm_attempts_total``, ``llm_repaired_total`` and ``llm_parse_failures``
    (rows whose first reply did not validate), and the sums of their per-row token and cache
    columns (``LLM_SUMS``: ``prompt_tokens``, ``completion_tokens``, ``cache_hits``,
    ``cache_misses``, ``cached_prompt_tokens``, ``cached_completion_tokens``); the image stage adds
    ``prompt_weights_stripped`` (rows whose (object:w) weights the pipeline could not apply). Other
    model stages with a generation cache add ``cache_hits``/``cache_misses`` from their per-row
    ``*_cache_hits``/``*_cache_misses`` columns (images; detections per phrase column).
    """
    order = [sp.stage.name for sp in p.row_stages(phase)]
    result = [{"stage": "ingest" if phase == "rows" else f"{phase}:ingest",
               "in": n_input + ingest_rejects + not_selected, "out": n_input,
               "rejected": ingest_rejects, "errored": 0, "not_selected": not_selected}]
    status = rows.column(R.STATUS).to_pylist()
    stage = rows.column(R.STAGE).to_pylist()
    for sp in p.row_stages(phase):
        entered = sum(reached(rows, order, sp.stage.name))
        rej = sum(1 for s, st in zip(status, stage) if st == sp.stage.name and s == R.REJECTED)
        err = sum(1 for s, st in zip(status, stage) if st == sp.stage.name and s == R.ERROR)
        wait = sum(1 for s, st in zip(status, stage) if st == sp.stage.name and s == R.WAITING)
        row = {"stage": sp.stage.name, "in": entered, "out": entered - rej - err - wait,
               "rejected": rej, "errored": err}
        if wait or R.WAITING in status:
            row["waiting"] = wait
        for c in ("llm_attempts", "llm_repaired"):
            col = f"{sp.stage.name}_{c}"
            if col in rows.column_names:
                vals = [v for v in rows.column(col).to_pylist() if v is not None]
                row[f"{c}_total"] = int(sum(int(v) for v in vals))
                if c == "llm_attempts":
                    row["llm_parse_failures"] = sum(1 for v in vals if int(v) > 1) + (
                        rej if not sp.cfg.params.get("max_repairs", 1) else 0)
        for c in LLM_SUMS if is_llm_stage(sp.stage) else ():
            raw = c if c.endswith("_tokens") and not c.startswith("cached") else f"llm_{c}"
            col = sp.stage.rename.get(raw, raw)  # the stage's name for the LLM stage's column
            if col in sp.outputs and col in rows.column_names:
                row[c] = int(pc.sum(rows.column(col)).as_py() or 0)
        for c in ("cache_hits", "cache_misses") if not is_llm_stage(sp.stage) else ():
            # model stages with a generation cache (text-to-image gen_*, detection det_*)
            for col in sp.outputs:  # the stage's output names, renamed
                if col.endswith(f"_{c}") and col in rows.column_names:
                    row[c] = row.get(c, 0) + int(pc.sum(rows.column(col)).as_py() or 0)
        if "prompt_weights_stripped" in sp.outputs and "prompt_weights_stripped" in rows.column_names:
            row["prompt_weights_stripped"] = sum(1 for v in rows.column("prompt_weights_stripped").to_pylist() if v)
        if sp.audit:
            row["audit_would_reject"] = sum(1 for a in rows.column(R.AUDIT).to_pylist()
                                            if a and f"{sp.stage.name}:" in a)
        result.append(row)
    return result


def print_funnel(rows: list[dict], file=sys.stdout) -> None:
    """Print the funnel as an aligned table."""
    priced = any(r.get("usd") is not None for r in rows)
    print(f"{'stage':<24}{'in':>8}{'out':>8}{'rejected':>10}{'errored':>9}{'wall_s':>9}"
          + (f"{'usd':>11}" if priced else ""), file=file)
    for r in rows:
        wall, usd = r.get("wall_s"), r.get("usd")
        print(f"{r['stage']:<24}{r['in']:>8}{r['out']:>8}{r['rejected']:>10}{r['errored']:>9}"
              f"{'' if wall is None else f'{wall:.2f}':>9}"
              + (f"{'' if usd is None else f'{usd:.4f}':>11}" if priced else ""), file=file)


def cache_section(recipe: Recipe, fun: list[dict]) -> dict:
    """``manifest["cache"]``: ``uri`` (None: no cache), ``cache_rejects``, and per stage that
    made model calls ``{"hits", "misses", "saved_prompt_tokens", "saved_completion_tokens"}``
    summed over the committed rows of the output (funnel rows; a stage key is
    ``phase:stage`` in multi-phase runs)."""
    stages = {}
    for r in fun:
        if "cache_hits" in r:
            key = f"{r['phase']}:{r['stage']}" if r.get("phase") else r["stage"]
            stages[key] = {"hits": r["cache_hits"], "misses": r["cache_misses"],
                           "saved_prompt_tokens": r.get("cached_prompt_tokens", 0),
                           "saved_completion_tokens": r.get("cached_completion_tokens", 0)}
    return {"uri": recipe.cache, "cache_rejects": recipe.cache_rejects, "stages": stages}


def with_waiting(rows: pa.Table, waiting: dict[str, str]) -> pa.Table:
    """``rows`` plus one row per waiting id (``_status`` waiting, ``_stage`` its stage), for the funnel."""
    if not waiting:
        return rows
    ids = sorted(waiting)
    extra = pa.table({R.ID: pa.array(ids, rows.schema.field(R.ID).type if R.ID in rows.column_names else None),
                      R.STATUS: [R.WAITING] * len(ids), R.STAGE: [waiting[i] for i in ids]})
    return pa.concat_tables([rows, extra], promote_options="default")
