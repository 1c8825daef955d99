"""Token cost and the spend budget of a run.

Prices come from the recipe (``prices:``: model name -> ``recipe.Price``, USD per 1M tokens, as
the provider lists them). A stage's cost is computed from its funnel row's token sums (the per-
row ``*_prompt_tokens``/``*_completion_tokens`` columns of the LLM stage, summed by
``jobs.core.funnel.funnel``): billed tokens are the row tokens minus the tokens of replies served by the
generation cache, which cost nothing and are reported as saved. ``openai_batch`` stages use the
batch prices; a missing price is never guessed: the stage's cost is then ``None`` and its model
is listed as unpriced.

Batch API round trip (``--batch``, ``jobs.core.batches``): the ``openai`` stages of such a run are
priced at the batch prices. A reply ingested from one of the output's own batches is counted by
the LLM stage as a call sent (a miss, billed tokens), not as a cache hit: it was paid for, at the
batch price, by this output. The cost is computed over the committed rows, so it is the cost of
the output, whichever run ingested the batch; rows still waiting are not counted yet. A resumed
output whose earlier runs sent calls directly is priced by the mode of the run that writes the
manifest (the per-call mode is not kept).

Budget (``--max-cost USD``, recipe ``max_cost``): the driver starts a ``actors.budget.SpendMeter``
actor; every priced LLM stage asks it before each batch of calls whether the projected spend
(this run's spend so far + the stage's average cost per call so far x the batch's calls) stays
within the limit, and reports what each batch cost. The first refusal stops the run: the stage
raises ``actors.budget.BudgetExceeded``, Ray Data stops, the committed blocks stay (a rerun
skips their ids), and ``driver.run`` writes the manifest with ``stopped: "budget"`` and raises
``BudgetStop``. The limit is per invocation: rerunning the same command resumes the rows not
committed and may spend up to the limit again.
"""
from __future__ import annotations

import time
from typing import Any

from actors.budget import METER_TIMEOUT_S
from jobs.core.engines import is_llm_stage
from jobs.core.recipe import Price, Recipe


class BudgetStop(RuntimeError):
    """The run stopped before its spend passed ``--max-cost``. ``spent_usd``: what this run's
    priced calls cost; ``limit_usd``: the limit; ``stage``: the stage that was refused."""

    def __init__(self, spent_usd: float, limit_usd: float, stage: str | None):
        self.spent_usd, self.limit_usd, self.stage = float(spent_usd), float(limit_usd), stage
        super().__init__(f"stopped: the projected spend would pass --max-cost {limit_usd:.4f} USD "
                         f"(spent {spent_usd:.4f} USD this run{f', next batch of {stage}' if stage else ''}); "
                         "committed rows are kept: rerun the same command to resume")


def tokens_usd(price: Price, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float | None:
    """USD for the given token counts at ``price`` (``batch``: the Batch API prices; None when
    one of them is not given)."""
    pin, pout = (price.batch_input_per_1m, price.batch_output_per_1m) if batch else \
        (price.input_per_1m, price.output_per_1m)
    if pin is None or pout is None:
        return None
    return (prompt_tokens * pin + completion_tokens * pout) / 1e6


def stage_price(recipe: Recipe, stage_plan) -> tuple[str | None, Price | None, bool]:
    """``(model name, its Price or None, batch?)`` of a planned LLM stage (``driver.StagePlan``);
    ``(None, None, False)`` for other stages."""
    if not is_llm_stage(stage_plan.stage) or stage_plan.resolved is None:
        return None, None, False
    spec = stage_plan.resolved.spec
    batch = spec.backend == "openai_batch" or (recipe.batch and spec.backend == "openai")
    return spec.model, recipe.prices.get(spec.model), batch


def cost_section(plan, recipe: Recipe, fun: list[dict], kept_rows: int) -> dict[str, Any]:
    """``manifest["cost"]`` from the funnel rows (token sums of the committed rows of the output).

    Returns ``{"currency": "USD", "total_usd", "saved_usd", "kept_rows", "per_kept_row_usd",
    "unpriced_models", "stages": {stage: {"model", "prompt_tokens", "completion_tokens",
    "billed_prompt_tokens", "billed_completion_tokens", "usd", "saved_usd"}}}``; ``usd`` is
    None for a stage whose model has no price. Also sets ``usd`` on the LLM funnel rows (for
    the progress output and the report). ``total_usd`` sums the priced stages.
    """
    by_name = {sp.stage.name: sp for sp in plan.stages}
    stages: dict[str, dict] = {}
    total = saved = 0.0
    unpriced: set[str] = set()
    for r in fun:
        sp = by_name.get(r["stage"])
        if sp is None or "prompt_tokens" not in r:
            continue
        model, price, batch = stage_price(recipe, sp)
        pt, ct = int(r.get("prompt_tokens", 0)), int(r.get("completion_tokens", 0))
        cpt, cct = int(r.get("cached_prompt_tokens", 0)), int(r.get("cached_completion_tokens", 0))
        entry = {"model": model, "prompt_tokens": pt, "completion_tokens": ct,
                 "billed_prompt_tokens": pt - cpt, "billed_completion_tokens": ct - cct, "usd": None, "saved_usd": None}
        usd = tokens_usd(price, pt - cpt, ct - cct, batch) if price else None
        if usd is None:
            if pt or ct:
                unpriced.add(model)
        else:
            entry["usd"] = round(usd, 6)
            entry["saved_usd"] = round(tokens_usd(price, cpt, cct, batch) or 0.0, 6)
            total += usd
            saved += entry["saved_usd"]
        r["usd"] = entry["usd"]
        stages[f"{r['phase']}:{r['stage']}" if r.get("phase") else r["stage"]] = entry
    return {"currency": "USD", "total_usd": round(total, 6), "saved_usd": round(saved, 6), "kept_rows": kept_rows,
            "per_kept_row_usd": round(total / kept_rows, 8) if kept_rows else None,
            "unpriced_models": sorted(m for m in unpriced if m), "stages": stages}


def budget_configs(plan, recipe: Recipe, meter_name: str | None) -> dict[str, dict]:
    """Per priced LLM stage, the ``budget=`` config its ``actors.llm.LLMStage`` gets:
    ``{"meter", "stage", "input_per_1m", "output_per_1m"}`` (batch prices for ``openai_batch``).
    Empty without a meter. Stages of unpriced models are not metered."""
    if not meter_name:
        return {}
    out = {}
    for sp in plan.stages:
        model, price, batch = stage_price(recipe, sp)
        if price is None:
            continue
        pin, pout = (price.batch_input_per_1m, price.batch_output_per_1m) if batch else \
            (price.input_per_1m, price.output_per_1m)
        if pin is not None and pout is not None:
            out[sp.stage.name] = {"meter": meter_name, "stage": sp.stage.name, "input_per_1m": pin,
                                  "output_per_1m": pout}
    return out


def start_meter(limit_usd: float, run_key: str):
    """Start this run's named ``SpendMeter`` actor; returns ``(name, handle)``."""
    import ray

    from actors.budget import SpendMeter

    name = f"mmsynth-spend-{run_key}-{int(time.time() * 1000)}"
    handle = ray.remote(num_cpus=0)(SpendMeter).options(name=name).remote(float(limit_usd))
    ray.get(handle.state.remote(), timeout=METER_TIMEOUT_S)
    return name, handle


def meter_state(handle) -> dict[str, Any]:
    """The meter's ``state()`` (``spent_usd``, ``limit_usd``, ``stopped``, ``stage``)."""
    import ray

    return ray.get(handle.state.remote(), timeout=METER_TIMEOUT_S)


def format_cost(cost: dict[str, Any]) -> str:
    """One line for the progress output: total, saved by the cache, per kept row, unpriced."""
    per = cost.get("per_kept_row_usd")
    line = (f"cost: {cost['total_usd']:.4f} USD (saved by the cache: {cost['saved_usd']:.4f} USD)"
            + (f", {per:.6f} USD per kept row ({cost['kept_rows']} rows)" if per is not None else ""))
    if cost.get("unpriced_models"):
        line += f"; not counted: no price in the recipe's prices: for {', '.join(cost['unpriced_models'])}"
    return line


def dry_run_table(plan, recipe: Recipe, previous: dict | None, rows: int | None) -> str:
    """The ``--dry-run`` price table: one line per LLM stage (model, USD per 1M input/output
    tokens) and, when ``previous`` (the manifest of an earlier run of this recipe, e.g. a
    ``--limit 20`` sample in ``--output``) has token counts, the measured tokens per input row
    and the projected USD for ``rows`` input rows (default: that run's input rows). Rows are
    ``--limit`` units: for MIRROR a client (its dialogues and turns scale with it). Nothing is
    guessed: without a previous run the estimate column says how to get one."""
    measured: dict[str, dict] = {}
    ingested = []
    for r in (previous or {}).get("funnel", []):
        if r["stage"] in ("ingest",) or r["stage"].endswith(":ingest"):
            ingested.append(int(r.get("out") or 0))
        elif "prompt_tokens" in r:
            measured[r["stage"]] = r
    # the sample's size in --limit units (an input row; MIRROR: a client, whose dialogues and turns
    # are later phases): its --limit where it had one, else its first phase's input rows
    limit = ((previous or {}).get("recipe") or {}).get("limit")
    n_prev = min(int(limit), max(ingested)) if limit and ingested else (ingested[0] if ingested else 0)
    rows = rows or n_prev
    lines = [f"  {'stage':<22}{'model':<22}{'in $/1M':>9}{'out $/1M':>9}{'tok/row in':>11}{'tok/row out':>12}"
             f"{'est. USD':>10}"]
    total, unknown = 0.0, False
    for sp in plan.stages:
        model, price, batch = stage_price(recipe, sp)
        if model is None:
            continue
        pin = pout = None
        if price is not None:
            pin, pout = (price.batch_input_per_1m, price.batch_output_per_1m) if batch else \
                (price.input_per_1m, price.output_per_1m)
        m = measured.get(sp.stage.name)
        tin = tout = est = None
        if m is not None and n_prev:
            tin, tout = m["prompt_tokens"] / n_prev, m["completion_tokens"] / n_prev
            if pin is not None and pout is not None and rows:
                est = (tin * pin + tout * pout) * rows / 1e6
        if est is None and price is not None:
            unknown = True
        total += est or 0.0
        fmt = (lambda v, w, d: f"{'-' if v is None else f'{v:.{d}f}':>{w}}")
        lines.append(f"  {sp.stage.name:<22}{model[:21]:<22}{fmt(pin, 9, 3)}{fmt(pout, 9, 3)}{fmt(tin, 11, 1)}"
                     f"{fmt(tout, 12, 1)}{fmt(est, 10, 2)}")
    if len(lines) == 1:
        return ""
    if measured and rows:
        lines.append(f"  estimated total for {rows} input rows (--limit units): {total:.2f} USD (token counts measured by the run "
                     "in --output; prices from the recipe, as listed by the providers)")
    if unknown or not measured:
        lines.append("  no measured token counts for some stages: run a sample first (e.g. --limit 20 --output OUT), "
                     "then --dry-run --output OUT [--limit N] projects its tokens per row to N rows")
    return "\n".join(lines)
