"""Run lifecycle shared by every pipeline: plan → ingest → execute (resumable) → export → manifest.

Layout of an output folder (local or ``s3://``)::

    OUT/_work/input/      normalized input rows (written once; a rerun reuses them)
    OUT/_work/rows/       every processed row with its status (Ray Data parquet sink): the
                          committed rows, one file per block, written as each block finishes
    OUT/rejects/          rejects.parquet (full rows) + rejects.jsonl (id, stage, reason)
    OUT/errors/           errors.parquet + errors.jsonl (id, stage, error record)
    OUT/manifest.json     recipe, models, versions, funnel, stage wall times
    OUT/...               the pipeline's own outputs (``pipeline.export``)

A pipeline whose rows change granularity (MIRROR: face images, client records, dialogues,
client turns) declares ``PHASES``, a list of ``Phase``: each phase has its own input rows
(built by its ingest from the committed rows of the earlier phases), stages, committed rows and
funnel, in ``OUT/_work/<phase>/`` and ``OUT/rejects|errors/<phase>.*``; ``export`` then gets
``{phase: rows}``.

Resume: rerunning the same command continues where the previous run stopped: the ids already
committed to ``_work/rows`` are skipped (skip-existing by id; a file cut short by a killed
writer is unreadable, so its rows count as not committed and are computed again); when every
input id is committed the Ray pipeline is not started at all (no model is loaded) and only the
export runs again. Ray Data's own ``CheckpointConfig`` is not used: on resume it adds a
``CheckpointFilter`` actor pool of whole-CPU actors, and on a 2-CPU box with model actors
holding CPU shares it and Ray's 1-CPU repartition tasks can wait on each other forever.

Batch API mode (``--batch``, ``jobs.core.batches``): rows whose LLM call went into a Batch API
request file come out of the stages ``waiting``; they are dropped before the write (never
committed), so the next run processes them again. After a phase's
execution the spooled calls are submitted as batches, the funnel counts those rows as
``waiting`` at their stage, later phases and the export wait, and the manifest lists the
batches (``batches``) and the waiting rows per stage (``waiting``). A ``--batch`` run first
polls and ingests the batches that finished.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from actors.models import ModelResolutionError, ResolvedModel, resolve
from jobs.core import batches, cost, report, stats, store
from jobs.core.engines import EngineConfigError, EnginePlan, EngineSet, check_runtime_env, is_llm_stage, plan_engines
from jobs.core.funnel import cache_section, funnel, with_waiting
from jobs.core.recipe import Recipe, RecipeError
from jobs.core.runtime import RAY_DATA_DEFAULTS, Stage, add_stage, drop_waiting, forwarded_env
from jobs.core.store import load_manifest, read_table, work, write_jsonl, write_table
from udfs import io
from udfs import rows as R

PACKAGES = ("ray", "torch", "transformers", "diffusers", "open_clip_torch", "sentence-transformers",
            "xgrammar", "openai", "pyarrow", "pydantic", "numpy", "vllm")


IO_NUM_CPUS = 0.1  # CPU share of the Ray Data read and write tasks
#: blocks of an automatically sized run (``block_rows_for``): small inputs get one row per block
AUTO_BLOCKS, AUTO_MAX_BLOCK_ROWS = 16, 16


class PlanError(ValueError):
    """The recipe cannot run: bad stage params, unknown model, or a missing input column."""


@dataclass
class StagePlan:
    """One enabled stage as it will run: its recipe config, resolved model, columns, audit flag."""

    stage: Stage
    cfg: Any
    resolved: ResolvedModel | None
    inputs: list[str]
    outputs: list[str]
    audit: bool = False
    phase: str = "rows"  # the Phase whose rows it maps ("rows" for single-phase pipelines)
    ingest: bool = False  # run by the phase's ingest over other rows, not mapped by execute
    engine: str | None = None  # the shared LLM engine it sends its requests to (jobs.core.engines)


@dataclass(frozen=True)
class Phase:
    """One row granularity of a multi-phase pipeline.

    ``ingest(recipe, previous)`` builds this phase's input rows from ``previous`` (``{phase
    name: committed rows}`` of the earlier phases) and returns ``(table, rejects, not_selected)``
    like a single-phase pipeline's ``ingest``; ``stages(recipe)`` are mapped over them;
    ``ingest_stages(recipe)`` are model stages the ingest itself runs (planned and reported,
    not mapped). A single-phase pipeline module is one phase named ``rows``.
    """

    name: str
    input_columns: tuple[str, ...]
    stages: Callable[[Recipe], list[Stage]]
    ingest: Callable[[Recipe, dict[str, pa.Table]], tuple[pa.Table, list[dict], int]]
    ingest_stages: Callable[[Recipe], list[Stage]] | None = None


def phases_of(pipeline) -> list[Phase]:
    """The pipeline's ``PHASES``, or the module itself as the single phase ``rows``."""
    if hasattr(pipeline, "PHASES"):
        return list(pipeline.PHASES)
    return [Phase("rows", tuple(pipeline.INPUT_COLUMNS), pipeline.stages,
                  lambda recipe, previous: pipeline.ingest(recipe), getattr(pipeline, "ingest_stages", None))]


@dataclass
class Plan:
    """The validated stage list of a run (``plan()``); nothing is loaded."""

    stages: list[StagePlan] = field(default_factory=list)
    engines: dict[str, EnginePlan] = field(default_factory=dict)

    def row_stages(self, phase: str = "rows") -> list[StagePlan]:
        """The stages mapped over the rows of ``phase`` (not the ones its ingest runs)."""
        return [sp for sp in self.stages if sp.phase == phase and not sp.ingest]

    def placeholder_stages(self) -> list[str]:
        """Names of stages whose model is a tiny random-init placeholder."""
        return [p.stage.name for p in self.stages if p.resolved is not None and p.resolved.placeholder]

    def audit_stages(self) -> list[str]:
        """Names of filters that record verdicts without applying them."""
        return [p.stage.name for p in self.stages if p.audit]


def plan(pipeline, recipe: Recipe) -> Plan:
    """Validate every stage's params, resolve its model and check its input columns.

    Phases are planned in order (``phases_of``). A phase may also declare ingest stages: model
    stages its ingest runs over other rows than the phase's own (MM-GEN's CLIP partition of
    the reference and candidate images, MIRROR's face pass over the face pool). They are
    validated, resolved, reported and recorded in the manifest like the others, but their
    columns are not checked against the row flow and ``execute`` does not map them. A
    filter's ``evidence`` may name a placeholder stage of an earlier phase. Nothing is loaded.
    Raises ``PlanError`` naming the stage and the problem.
    """
    result = Plan()
    placeholders: set[str] = set()
    known: set[str] = set()
    for ph in phases_of(pipeline):
        available = set(ph.input_columns) | {R.ID, *R.CONTROL_COLUMNS}
        pre = list(ph.ingest_stages(recipe)) if ph.ingest_stages else []
        for stage in [*pre, *ph.stages(recipe)]:
            known.add(stage.name)
            cfg = recipe.stages.get(stage.name)
            if cfg is None:
                raise PlanError(f"stage {stage.name!r}: missing from the recipe's stages")
            if not cfg.enabled:
                continue
            try:
                stage.validated_params(cfg.params)
            except ValueError as e:
                first = str(e).splitlines()
                raise PlanError(f"stage {stage.name!r}: invalid params: {' '.join(first[:3])}") from None
            resolved = None
            try:
                check_runtime_env(cfg.runtime_env, f"stage {stage.name!r}")
            except EngineConfigError as e:
                raise PlanError(str(e)) from None
            if cfg.engine and not is_llm_stage(stage):
                raise PlanError(f"stage {stage.name!r}: only LLM stages use engines (engine: {cfg.engine!r})")
            if stage.is_actor:
                spec = cfg.model
                if cfg.engine and cfg.model is None and cfg.engine in recipe.engines:
                    spec = recipe.engines[cfg.engine].model
                if spec is None:
                    raise PlanError(f"stage {stage.name!r}: needs a model spec (model:, or engine: for LLM stages)")
                try:
                    resolved = resolve(spec)
                except ModelResolutionError as e:
                    raise PlanError(f"stage {stage.name!r}: {e}") from None
                if resolved.placeholder:
                    placeholders.add(stage.name)
            ins, outs = stage.columns(cfg.params)
            if stage in pre:
                result.stages.append(StagePlan(stage, cfg, resolved, ins, outs, False, ph.name, ingest=True))
                continue
            missing = [c for c in ins if c not in available]
            if missing:
                raise PlanError(f"stage {stage.name!r}: input columns {missing} are not produced upstream")
            audit = bool(stage.filter and (cfg.audit if cfg.audit is not None else
                                           any(e in placeholders for e in stage.evidence)))
            result.stages.append(StagePlan(stage, cfg, resolved, ins, outs, audit, ph.name))
            available |= set(outs)
    extra = set(recipe.stages) - known
    if extra:
        raise PlanError(f"recipe names unknown stages {sorted(extra)}")
    llm = [sp for sp in result.stages if is_llm_stage(sp.stage) and not sp.ingest]
    try:
        result.engines = plan_engines([(sp.stage.name, sp.cfg) for sp in llm], recipe)
    except EngineConfigError as e:
        raise PlanError(str(e)) from None
    for sp in llm:
        sp.engine = next((n for n, e in result.engines.items() if sp.stage.name in e.stages), None)
    unused = set(recipe.engines) - set(result.engines)
    if unused:
        raise PlanError(f"engines {sorted(unused)} are not used by any enabled stage")
    return result


def _missing_api_credentials(opts: dict) -> str | None:
    """The credential variable(s) an OpenAI-compatible stage reads that are unset here (for the
    dry-run note), or None: ``api_key_env`` (default ``OPENAI_API_KEY``); for Azure
    (``api_type: azure``) the key variable or else the AD-token variable."""
    if opts.get("api_type") == "azure":
        key_env = opts.get("api_key_env", "AZURE_OPENAI_API_KEY")
        token_env = opts.get("azure_ad_token_env", "AZURE_OPENAI_AD_TOKEN")
        if key_env in os.environ or token_env in os.environ:
            return None
        return f"neither API key variable {key_env} nor Azure AD token variable {token_env}"
    key_env = opts.get("api_key_env", "OPENAI_API_KEY")
    return None if not key_env or key_env in os.environ else f"API key variable {key_env}"


def describe_plan(p: Plan) -> str:
    """Human-readable dry-run report: one line per stage with model, placeholder and audit flags."""
    lines = []
    for sp in p.stages:
        kind = ("engine client" if sp.engine else "actor" if sp.stage.is_actor else "task") + (" (ingest)" if sp.ingest else "")
        if sp.phase != "rows":
            kind = f"{sp.phase}: {kind}"
        model = ""
        if sp.resolved is not None:
            model = f" model={sp.resolved.spec.backend}:{sp.resolved.spec.model}"
            if sp.resolved.placeholder:
                model += " [PLACEHOLDER: tiny random-init weights]"
        if sp.engine:
            model += f" engine={sp.engine}"
        flags = " [audit mode: verdicts recorded, not applied]" if sp.audit else ""
        if sp.resolved is not None and sp.resolved.spec.backend == "openai":
            missing = _missing_api_credentials(sp.resolved.spec.options)
            if missing:
                flags += f" [{missing} is not set here; the nodes that run it need it]"
        lines.append(f"  {sp.stage.name:<22} {kind:<20} in={','.join(sp.inputs) or '-'} "
                     f"out={','.join(sp.outputs)}{model}{flags}")
    for name, e in p.engines.items():
        c = e.config
        env = c.runtime_env.ray_dict() if c.runtime_env else {}
        where = f" runtime_env={env}" if env else ""
        if e.resolved.spec.backend == "vllm" and not (c.runtime_env and c.runtime_env.py_executable) \
                and importlib.util.find_spec("vllm") is None:
            where += " [vllm is not installed here; the nodes that run this engine need it (the gpu extra)]"
        lines.append(f"  engine {name}: {e.resolved.spec.backend}:{e.resolved.spec.model} replicas "
                     f"{c.min_replicas}..{c.max_replicas} x (num_cpus {c.num_cpus}, num_gpus {c.num_gpus}), "
                     f"serves {', '.join(e.stages)}{where}")
    return "\n".join(lines)


# ---------------------------------------------------------------- run

def ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    for k, v in RAY_DATA_DEFAULTS.items():  # the driver plans reads too
        os.environ.setdefault(k, v)
    env = forwarded_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:  # a private local cluster, never someone else's
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False)


def check_inputs(recipe: Recipe) -> None:
    """Raise ``FileNotFoundError`` naming the option and the path when an input the recipe
    names (``Recipe.input_uris``) does not exist, so a typo costs no cluster start."""
    for option, uris in recipe.input_uris().items():
        for uri in uris:
            if not io.exists(uri):
                raise FileNotFoundError(f"{option} {uri}: no such file or folder")


def block_rows_for(recipe: Recipe, n_rows: int) -> int:
    """Rows per Ray Data block: the recipe's ``block_rows``, else sized from the input so a run
    has about ``AUTO_BLOCKS`` blocks of at most ``AUTO_MAX_BLOCK_ROWS`` rows. A small run then
    streams one row per block: every stage has work while the others run, the progress bars
    move per row, and a killed worker redoes one row, not the whole run."""
    if recipe.block_rows:
        return recipe.block_rows
    return max(1, min(AUTO_MAX_BLOCK_ROWS, math.ceil(n_rows / AUTO_BLOCKS)))


def fingerprint(recipe: Recipe) -> dict:
    """What decides a run's rows: input, limit, seed and the pipeline's own settings (stage
    settings may change between a run and its resume)."""
    return recipe.model_dump(mode="json", exclude={"stages", "output", "profile", "block_rows", "cache",
                                                   "cache_rejects", "prices", "max_cost", "batch"})


def _ingest(phase: Phase, recipe: Recipe, out: str, state: str,
            previous: dict[str, pa.Table]) -> tuple[pa.Table, int, list[dict]]:
    """Normalized input rows of ``phase``, the number of rows ``--limit``/``total_num``
    left out, and the per-stage table of the model stages the ingest ran (``jobs.core.stats.record``).

    Written once to ``<state>/input`` (``.complete`` marks a finished ingest) so a rerun sees
    the same rows. Raises ``RecipeError`` when OUT holds a run of a different input/limit.
    """
    marker = io.join(state, "input", ".complete")
    if io.exists(marker):
        info = json.loads(io.read_text(marker))
        if info["fingerprint"] != fingerprint(recipe):
            old = {k: v for k, v in info["fingerprint"].items() if fingerprint(recipe).get(k) != v}
            raise RecipeError(f"{out} holds a run with different settings {old}; "
                              "rerun with those settings to resume, or use a new --output")
        return read_table(io.join(state, "input")), info["not_selected"], info.get("stage_stats", [])
    io.delete(io.join(state, "input"))
    stats.drain()
    table, rejects, not_selected = phase.ingest(recipe, previous)
    ingest_stats = stats.drain()
    n = table.num_rows
    for name in R.CONTROL_COLUMNS:  # an ingest may preset _placeholder (its own placeholder stages)
        if name not in table.column_names:
            table = table.append_column(name, pa.array([R.OK if name == R.STATUS else ""] * n, pa.string()))
    if rejects:
        write_table(pa.Table.from_pylist(rejects), io.join(state, "ingest_rejects", "rejects.parquet"))
    block = block_rows_for(recipe, n)
    for k in range(max(1, math.ceil(n / block))):
        write_table(table.slice(k * block, block), io.join(state, "input", f"part-{k:05d}.parquet"))
    io.write_text(marker, json.dumps({"fingerprint": fingerprint(recipe), "rows": n, "not_selected": not_selected,
                                      "stage_stats": ingest_stats}))
    return table, not_selected, ingest_stats


def _ray_path(uri: str) -> str:
    """Path form Ray Data's readers/writers expect with an explicit filesystem."""
    return uri if io.is_remote(uri) else io.filesystem(uri)[1]


def execute(pipeline, recipe: Recipe, p: Plan, out: str, input_table: pa.Table, phase: str = "rows",
            state: str | None = None, engines: EngineSet | None = None, meter=None,
            budgets: dict[str, dict] | None = None, batch: bool = False, todo: pa.Table | None = None) -> list[dict]:
    """Run ``phase``'s stages on Ray Data over its rows not yet committed (``todo``, default
    ``uncommitted(input_table, state)``; state folder ``state``, default ``OUT/_work``), starting the shared LLM engines they use (``engines``,
    kept running for later phases); returns the per-stage table (``jobs.core.stats.stage_table``).

    ``meter``/``budgets``: the run's spend meter actor and the per-stage meter configs
    (``jobs.core.cost``); when the meter refused a batch the execution stops and this raises
    ``cost.BudgetStop`` (the blocks committed before stay). ``batch``: Batch API mode (the
    ``openai`` LLM stages spool their uncached calls; waiting rows are not written)."""
    import ray.data
    from ray.data import DataContext

    fs, _ = io.filesystem(out)
    state = state or work(out)
    ctx = DataContext.get_current()
    ctx.per_stage_map_timing = True  # split fused operators' time per stage (jobs.core.stats)
    block_rows = block_rows_for(recipe, input_table.num_rows)  # from the whole input: stable across resumes
    todo = uncommitted(input_table, state) if todo is None else todo
    # One Ray Data block per block_rows rows of the rows not committed yet: a block is the unit
    # of progress a resumed run keeps. The blocks are cut here, so no repartition (whose tasks
    # ask for a whole CPU each) runs between the input and the stages.
    ds = ray.data.from_arrow([todo.slice(k, block_rows) for k in range(0, max(todo.num_rows, 1), block_rows)])
    if hasattr(pipeline, "before_run"):
        pipeline.before_run(recipe, out)
    needed = [sp.engine for sp in p.row_stages(phase) if sp.engine]
    if needed:
        engines = engines or EngineSet(p.engines, R.content_id(out)[:8], forwarded_env())
        engines.start(needed)
    cache = {"uri": recipe.cache, "cache_rejects": recipe.cache_rejects} if recipe.cache else None
    for sp in p.row_stages(phase):
        ref = engines.ref(sp.engine, sp.stage.name) if sp.engine else None
        stage_cache = cache
        if batch and cache and batched(sp):
            stage_cache = {**cache, "batch": batches.stage_config(out, phase, sp.stage.name)}
        ds = add_stage(ds, sp.stage, sp.cfg, sp.resolved, audit=sp.audit, block_rows=block_rows, engine=ref,
                       engine_tasks=p.engines[sp.engine].config.batches_in_flight if sp.engine else 2,
                       cache=stage_cache, budget=(budgets or {}).get(sp.stage.name))
    if batch:  # waiting rows are not final: never committed (the next run computes them again)
        ds = ds.map_batches(drop_waiting, batch_format="pyarrow", num_cpus=IO_NUM_CPUS, zero_copy_batch=True)
    rows_uri = io.join(state, "rows")
    # min_bytes_per_file=1: every block is committed as soon as it is done (the resume unit),
    # instead of Ray combining small blocks into one file written at the end.
    try:
        ds.write_parquet(_ray_path(rows_uri), filesystem=fs, min_bytes_per_file=1,
                         ray_remote_args={"num_cpus": IO_NUM_CPUS})
    except Exception:
        state_now = cost.meter_state(meter) if meter is not None else None
        if state_now and state_now["stopped"]:  # a stage was refused: a clean stop, not a failure
            raise cost.BudgetStop(state_now["spent_usd"], state_now["limit_usd"], state_now["stage"]) from None
        raise
    return stats.stage_table(ds, [sp.stage.name for sp in p.row_stages(phase)])


def uncommitted(input_table: pa.Table, state: str) -> pa.Table:
    """The rows of ``input_table`` whose ids are not committed to ``state``'s ``rows`` yet
    (all of them when nothing is)."""
    done = read_table(io.join(state, "rows"), columns=[R.ID])
    if done is None:
        return input_table
    ids = input_table.column(R.ID)
    return input_table.filter(pc.invert(pc.is_in(ids, value_set=done.column(R.ID).cast(ids.type))))


def batched(sp: StagePlan) -> bool:
    """Does this stage's work go through the Batch API in a ``--batch`` run? (an LLM stage on an
    OpenAI-compatible API, backend ``openai``)"""
    return is_llm_stage(sp.stage) and sp.resolved is not None and sp.resolved.spec.backend == "openai"


def check_batch(p: Plan, recipe: Recipe) -> None:
    """Raise ``PlanError`` when ``--batch`` cannot apply: no LLM stage on an OpenAI-compatible
    API, or ``--max-cost`` (a batch's spend is known only after the provider ran it)."""
    if not recipe.batch:
        return
    if not any(batched(sp) for sp in p.stages if not sp.ingest):
        raise PlanError("--batch needs at least one LLM stage on an OpenAI-compatible API (backend openai)")
    if recipe.max_cost:
        raise PlanError("--max-cost cannot be combined with --batch (a batch's spend is known only after it ran)")


def _versions() -> dict[str, str]:
    v = {}
    for pkg in PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def _split_outputs(rows: pa.Table, out: str, ingest: pa.Table | None, name: str | None = None) -> None:
    """Write rejects/ and errors/ (full rows as parquet, id/stage/reason as JSONL); ``ingest``
    holds the rejects of the ingest step, listed first in ``rejects.jsonl``. ``name``: the
    files' base name (default ``rejects``/``errors``; a phase's name in multi-phase runs)."""
    status = rows.column(R.STATUS)
    for st, folder in ((R.REJECTED, "rejects"), (R.ERROR, "errors")):
        mask = pc.equal(status, st)
        sel = rows.filter(mask)
        recs = [{"id": i, "stage": s, "reason": (json.loads(r) if st == R.ERROR else r)}
                for i, s, r in zip(sel.column(R.ID).to_pylist(), sel.column(R.STAGE).to_pylist(),
                                   sel.column(R.REASON).to_pylist())]
        if ingest is not None and st == R.REJECTED:
            recs = ingest.select(["id", "stage", "reason"]).to_pylist() + recs
        write_table(sel, io.join(out, folder, f"{name or folder}.parquet"))
        write_jsonl(recs, io.join(out, folder, f"{name or folder}.jsonl"))


def run(pipeline, recipe: Recipe, argv: list[str], address: str | None = None) -> dict:
    """Run (or resume) a pipeline end to end and return the manifest.

    ``address``: a Ray cluster to connect to; default ``$RAY_ADDRESS`` (set inside a Ray
    job), else a private local cluster.
    """
    if not recipe.output:
        raise RecipeError("--output is required")
    out = recipe.output.rstrip("/")
    p = plan(pipeline, recipe)
    check_inputs(recipe)
    check_batch(p, recipe)
    if recipe.batch and not recipe.cache:
        recipe = recipe.model_copy(update={"cache": batches.default_cache(out)})
    if recipe.max_cost and not cost.budget_configs(p, recipe, "check"):
        raise PlanError("--max-cost needs recipe prices (prices: MODEL: {input_per_1m, output_per_1m}) for the "
                        "model of at least one LLM stage")
    started = datetime.now(timezone.utc)
    t0 = time.time()
    store.mark_running(out, {"started": started.isoformat(), "command": argv})
    ray_init(address)
    import ray

    phases = phases_of(pipeline)
    single = not hasattr(pipeline, "PHASES")
    previous = load_manifest(out) if io.exists(io.join(out, "manifest.json")) else None
    old_tables = {}  # phase -> the per-stage table of the run that did its work
    for row in (previous or {}).get("stage_stats", []):
        if not row.get("ingest"):
            old_tables.setdefault(row.get("phase", "rows"), []).append(row)
    stage_stats: list[dict] = []
    fun: list[dict] = []
    by_phase: dict[str, pa.Table] = {}
    processed, resumed = 0, False
    engines = EngineSet(p.engines, R.content_id(out)[:8], forwarded_env())
    meter, budgets, stopped = None, {}, None
    waiting: dict[str, int] = {}  # stage key -> rows waiting for a batch (--batch)
    if recipe.batch:  # ingest what finished; this run spools afresh
        batches.poll(out)
        batches.clear_spool(out)
    if recipe.max_cost:
        meter_name, meter = cost.start_meter(recipe.max_cost, R.content_id(out)[:8])
        budgets = cost.budget_configs(p, recipe, meter_name)
    try:
        for ph in phases:
            state = work(out) if single else work(out, ph.name)
            input_table, not_selected, ingest_stats = _ingest(ph, recipe, out, state, by_phase)
            stage_stats.extend({"phase": ph.name, "ingest": True, **r} for r in ingest_stats)
            todo = uncommitted(input_table, state)
            resumed = resumed or todo.num_rows < input_table.num_rows
            processed += todo.num_rows
            table: list[dict] = []
            if todo.num_rows:
                try:
                    table = [{"phase": ph.name, **r} for r in
                             execute(pipeline, recipe, p, out, input_table, ph.name, state, engines, meter, budgets,
                                     batch=recipe.batch, todo=todo)]
                except cost.BudgetStop as e:
                    stopped = e
            if not table:  # nothing ran now: keep the figures of the run that did the work
                table = old_tables.get(ph.name, [])
            stage_stats.extend(table)
            per_stage = stats.by_stage(table)
            committed = read_table(io.join(state, "rows"))
            spool = batches.read_spool(out, ph.name) if recipe.batch else []
            if spool:
                batches.submit(out, ph.name, spool, {sp.stage.name: sp.resolved for sp in p.row_stages(ph.name)
                                                     if batched(sp)}, recipe.cache)
            waiting_ids = batches.waiting_rows(spool)
            for stage_name in waiting_ids.values():
                key = stage_name if single else f"{ph.name}:{stage_name}"
                waiting[key] = waiting.get(key, 0) + 1
            rows = _exactly_once(committed if committed is not None else input_table.slice(0, 0), input_table,
                                 partial=stopped is not None, waiting=set(waiting_ids))
            ingest_rej = read_table(io.join(state, "ingest_rejects"))
            n_ingest_rej = ingest_rej.num_rows if ingest_rej is not None else 0
            phase_fun = funnel(p, with_waiting(rows, waiting_ids), n_ingest_rej, input_table.num_rows, not_selected,
                               ph.name)
            for r in phase_fun:
                r.update(per_stage.get(r["stage"], {}))
                if not single:
                    r["phase"] = ph.name
            fun.extend(phase_fun)
            _split_outputs(rows, out, ingest_rej, None if single else ph.name)
            by_phase[ph.name] = rows
            if stopped or waiting_ids:  # later phases need this one's rows complete
                break
        engines.collect()
    finally:
        engines.stop()
    # a run stopped by its budget exports nothing: its outputs would be partial (the rerun exports)
    # nor does a run with rows waiting for batches (the run that gets their results exports)
    exported = {} if stopped or waiting else pipeline.export(by_phase["rows"] if single else by_phase, recipe, out)
    # a pipeline whose last step selects among sub-row units (MM-GEN's loss filter over
    # samples, MIRROR's whole-dialogue drop) reports it as extra funnel rows:
    # {"stage", "in", "out", "rejected", "errored", "unit"}
    fun.extend(exported.pop("funnel", []) if isinstance(exported, dict) else [])
    last = list(by_phase.values())[-1] if by_phase else None
    kept = sum(1 for st in last.column(R.STATUS).to_pylist() if st == R.OK) if last is not None else 0
    manifest = {
        "pipeline": recipe.pipeline,
        "command": argv,
        "recipe": recipe.model_dump(mode="json"),
        "models": {sp.stage.name: sp.resolved.describe() for sp in p.stages if sp.resolved is not None},
        "placeholder_stages": p.placeholder_stages(),
        "audit_stages": p.audit_stages(),
        "versions": {"python": platform.python_version(), **_versions()},
        "ray_version": ray.__version__,
        "seed": recipe.seed,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(time.time() - t0, 2),
        "resumed": resumed,
        "rows_processed_this_run": processed,
        "runs": (previous or {}).get("runs", []) + [{"started": started.isoformat(), "rows_processed": processed,
                                                     "wall_s": round(time.time() - t0, 2), "command": argv}],
        "funnel": fun,
        # "budget": --max-cost stopped the run before its spend passed the limit (rerun to resume)
        "stopped": "budget" if stopped else None,
        # USD per stage and per kept row from the recipe's prices (jobs.core.cost)
        "cost": cost.cost_section(p, recipe, fun, kept),
        "budget": None if meter is None else {"max_cost_usd": recipe.max_cost, **{
            k: v for k, v in cost.meter_state(meter).items() if k in ("spent_usd", "stopped", "stage", "per_stage")}},
        # generation cache: per LLM stage, calls served from it and calls sent (committed rows)
        "cache": cache_section(recipe, fun),
        # --batch: every Batch API batch of this output (jobs.core.batches.summary) and the rows
        # waiting for one, per stage (not committed; rerun the same command after they finished)
        "batches": batches.summary(batches.records(out)),
        "waiting": waiting,
        # the shared LLM engines: spec, replicas, stages served, requests and tokens (this run's,
        # or the last run that started them when nothing needed them now)
        "engines": _engine_section(engines, previous),
        # Ray Data's per-operator statistics of each phase (jobs.core.stats.stage_table)
        "stage_stats": stage_stats,
        "outputs": exported,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    io.write_text(io.join(out, "manifest.json"), json.dumps(manifest, indent=2, default=str))
    store.clear_running(out)
    report.write_quietly(out)
    if stopped:
        raise stopped
    return manifest


def _engine_section(engines: EngineSet, previous: dict | None) -> list[dict]:
    """``engines.stats()``; for engines this run did not start, the figures of the previous
    run's manifest (kept like the per-stage table of a resumed run)."""
    old = {e["name"]: e for e in (previous or {}).get("engines", [])}
    return [e if e["started_this_run"] or e["name"] not in old else {**old[e["name"]], "started_this_run": False}
            for e in engines.stats()]


def _exactly_once(rows: pa.Table, input_table: pa.Table, partial: bool = False,
                  waiting: set[str] | None = None) -> pa.Table:
    """Committed rows, one per input id. Ray Data commits each block once; a row could only
    appear twice if a block were written twice (a task retried after its file was written),
    and then the first copy is kept. Raises ``RuntimeError`` if an
    input id has no committed row (a row would be lost), unless ``partial`` (a run stopped
    by its budget: the rerun processes them) or the id is ``waiting`` for a Batch API batch."""
    ids = rows.column(R.ID).to_pylist()
    first: dict[str, int] = {}
    for k, i in enumerate(ids):
        first.setdefault(i, k)
    if len(first) != len(ids):
        rows = rows.take(pa.array(sorted(first.values()), pa.int64()))
    missing = set(input_table.column(R.ID).to_pylist()) - set(first) - (waiting or set())
    if missing and not partial:
        raise RuntimeError(f"{len(missing)} input rows have no committed result (e.g. {sorted(missing)[:3]}); "
                           "rerun the same command to process them")
    return rows
