"""Run lifecycle shared by every pipeline: plan → ingest → execute (resumable) → export → manifest.

Layout of an output folder (local or ``s3://``)::

    OUT/_work/input/      normalized input rows (written once; a rerun reuses them)
    OUT/_work/rows/       every processed row with its status (Ray Data parquet sink)
    OUT/_work/checkpoint/ Ray Data checkpoint keyed on ``id`` (kept after success)
    OUT/rejects/          rejects.parquet (full rows) + rejects.jsonl (id, stage, reason)
    OUT/errors/           errors.parquet + errors.jsonl (id, stage, error record)
    OUT/manifest.json     recipe, models, versions, funnel, stage wall times
    OUT/...               the pipeline's own outputs (``pipeline.export``)

Resume: rerunning the same command continues where the previous run stopped. Ray Data's
checkpointing (``CheckpointConfig`` on ``id``) skips rows already committed to
``_work/rows``; when every input id is committed the Ray pipeline is not started at all (no
model is loaded) and only the export runs again.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from actors.models import ModelResolutionError, ResolvedModel, resolve
from jobs.recipe import Recipe, RecipeError
from jobs.runtime import Stage, add_stage, forwarded_env
from udfs import io
from udfs import rows as R

PACKAGES = ("ray", "torch", "transformers", "diffusers", "open_clip_torch", "sentence-transformers",
            "xgrammar", "openai", "pyarrow", "pydantic", "numpy", "vllm")


IO_NUM_CPUS = 0.1  # CPU share of the Ray Data read and write tasks
UNSUPPORTED_IN_PIPELINES = {
    "vllm": "backend 'vllm' is not wired into pipeline stages yet (actors.llm.build_vllm_processor builds "
            "the ray.data.llm processor); serve the model with `vllm serve` and use backend 'openai' "
            "with options.base_url pointing at it",
}


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
    phase: str = "rows"  # "ingest": run by the pipeline's ingest (not a map over the rows)


@dataclass
class Plan:
    """The validated stage list of a run (``plan()``); nothing is loaded."""

    stages: list[StagePlan] = field(default_factory=list)

    def row_stages(self) -> list[StagePlan]:
        """The stages mapped over the rows (not the ones the pipeline's ingest runs)."""
        return [sp for sp in self.stages if sp.phase == "rows"]

    def placeholder_stages(self) -> list[str]:
        """Names of stages whose model is a tiny random-init placeholder."""
        return [p.stage.name for p in self.stages if p.resolved is not None and p.resolved.placeholder]

    def audit_stages(self) -> list[str]:
        """Names of filters that record verdicts without applying them."""
        return [p.stage.name for p in self.stages if p.audit]


def _ingest_stages(pipeline, recipe: Recipe) -> list[Stage]:
    return list(pipeline.ingest_stages(recipe)) if hasattr(pipeline, "ingest_stages") else []


def plan(pipeline, recipe: Recipe) -> Plan:
    """Validate every stage's params, resolve its model and check its input columns.

    A pipeline may also declare ``ingest_stages(recipe)``: model stages its ``ingest`` runs
    over other rows than the main ones (MM-GEN's CLIP partition of the reference and
    candidate images). They are validated, resolved, reported and recorded in the manifest
    like the others (phase ``ingest``), but their columns are not checked against the row
    flow and ``execute`` does not map them. Nothing is loaded. Raises ``PlanError`` naming
    the stage and the problem.
    """
    available = set(pipeline.INPUT_COLUMNS) | {R.ID, *R.CONTROL_COLUMNS}
    result = Plan()
    placeholders: set[str] = set()
    pre = {s.name for s in _ingest_stages(pipeline, recipe)}
    for stage in [*_ingest_stages(pipeline, recipe), *pipeline.stages(recipe)]:
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
        if stage.is_actor:
            if cfg.model is None:
                raise PlanError(f"stage {stage.name!r}: needs a model spec")
            try:
                resolved = resolve(cfg.model)
            except ModelResolutionError as e:
                raise PlanError(f"stage {stage.name!r}: {e}") from None
            if resolved.spec.backend in UNSUPPORTED_IN_PIPELINES:
                raise PlanError(f"stage {stage.name!r}: {UNSUPPORTED_IN_PIPELINES[resolved.spec.backend]}")
            if resolved.placeholder:
                placeholders.add(stage.name)
        ins, outs = stage.columns(cfg.params)
        if stage.name in pre:
            result.stages.append(StagePlan(stage, cfg, resolved, ins, outs, False, phase="ingest"))
            continue
        missing = [c for c in ins if c not in available]
        if missing:
            raise PlanError(f"stage {stage.name!r}: input columns {missing} are not produced upstream")
        audit = bool(stage.filter and (cfg.audit if cfg.audit is not None else
                                       any(e in placeholders for e in stage.evidence)))
        result.stages.append(StagePlan(stage, cfg, resolved, ins, outs, audit))
        available |= set(outs)
    extra = set(recipe.stages) - {s.name for s in pipeline.stages(recipe)} - pre
    if extra:
        raise PlanError(f"recipe names unknown stages {sorted(extra)}")
    return result


def describe_plan(p: Plan) -> str:
    """Human-readable dry-run report: one line per stage with model, placeholder and audit flags."""
    lines = []
    for sp in p.stages:
        kind = ("actor" if sp.stage.is_actor else "task") + (" (ingest)" if sp.phase == "ingest" else "")
        model = ""
        if sp.resolved is not None:
            model = f" model={sp.resolved.spec.backend}:{sp.resolved.spec.model}"
            if sp.resolved.placeholder:
                model += " [PLACEHOLDER: tiny random-init weights]"
        flags = " [audit mode: verdicts recorded, not applied]" if sp.audit else ""
        key_env = sp.resolved.spec.options.get("api_key_env", "OPENAI_API_KEY") if sp.resolved else None
        if sp.resolved is not None and sp.resolved.spec.backend == "openai" and key_env \
                and key_env not in os.environ:
            flags += f" [API key variable {key_env} is not set here; the nodes that run it need it]"
        lines.append(f"  {sp.stage.name:<22} {kind:<14} in={','.join(sp.inputs) or '-'} "
                     f"out={','.join(sp.outputs)}{model}{flags}")
    return "\n".join(lines)


# ---------------------------------------------------------------- storage of rows

def work(out: str, *parts: str) -> str:
    """URI of ``OUT/_work/<parts>`` (the run's internal state)."""
    return io.join(out, "_work", *parts)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parquet files under ``uri`` as one table, schemas unified (null → typed); None if absent.

    A file that cannot be read (cut short by a killed writer) is skipped with a warning: its
    rows were never committed to the checkpoint, so the next run computes them again.
    """
    files = io.list_files(uri, ".parquet")
    if not files:
        return None
    fs, _ = io.filesystem(uri)
    paths, schemas = [], []
    for f in files:
        path = io.filesystem(f)[1]
        try:
            schemas.append(pq.read_schema(path, filesystem=fs))
            paths.append(path)
        except (OSError, pa.ArrowInvalid) as e:
            print(f"warning: skipping unreadable {f}: {e}", file=sys.stderr)
    if not paths:
        return None
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return pds.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()


def write_table(table: pa.Table, uri: str) -> None:
    """Write one parquet file at ``uri`` (local or s3)."""
    fs, path = io.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def write_jsonl(records: list[dict], uri: str) -> None:
    """Write records as JSON lines at ``uri``."""
    io.write_text(uri, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


# ---------------------------------------------------------------- run

def _ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = forwarded_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:  # a private local cluster, never someone else's
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False)


def fingerprint(recipe: Recipe) -> dict:
    """What decides a run's rows: input, limit, seed and the pipeline's own settings (stage
    settings may change between a run and its resume)."""
    return recipe.model_dump(mode="json", exclude={"stages", "output", "profile", "block_rows"})


def _ingest(pipeline, recipe: Recipe, out: str) -> tuple[pa.Table, int]:
    """Normalized input rows and the number of rows ``--limit``/``total_num`` left out.

    Written once to ``_work/input`` (``.complete`` marks a finished ingest) so a rerun sees
    the same rows. Raises ``RecipeError`` when OUT holds a run of a different input/limit.
    """
    marker = work(out, "input", ".complete")
    if io.exists(marker):
        info = json.loads(io.read_text(marker))
        if info["fingerprint"] != fingerprint(recipe):
            old = {k: v for k, v in info["fingerprint"].items() if fingerprint(recipe).get(k) != v}
            raise RecipeError(f"{out} holds a run with different settings {old}; "
                              "rerun with those settings to resume, or use a new --output")
        return read_table(work(out, "input")), info["not_selected"]
    io.delete(work(out, "input"))
    table, rejects, not_selected = pipeline.ingest(recipe)
    n = table.num_rows
    for name in R.CONTROL_COLUMNS:  # an ingest may preset _placeholder (its own placeholder stages)
        if name not in table.column_names:
            table = table.append_column(name, pa.array([R.OK if name == R.STATUS else ""] * n, pa.string()))
    if rejects:
        write_table(pa.Table.from_pylist(rejects), work(out, "ingest_rejects", "rejects.parquet"))
    block = max(1, recipe.block_rows)
    for k in range(max(1, math.ceil(n / block))):
        write_table(table.slice(k * block, block), work(out, "input", f"part-{k:05d}.parquet"))
    io.write_text(marker, json.dumps({"fingerprint": fingerprint(recipe), "rows": n, "not_selected": not_selected}))
    return table, not_selected


def _stage_wall_times(ds, names: list[str]) -> dict[str, dict]:
    """Per-stage wall seconds and rows/s from Ray Data's own statistics (fused operators share)."""
    try:
        summary = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - stats are best effort; the funnel does not depend on them
        return {}
    out: dict[str, dict] = {}
    stack = [summary]
    while stack:
        s = stack.pop()
        stack.extend(getattr(s, "parents", []) or [])
        for op in s.operators_stats:
            # "MapBatches(a)->MapBatches(b)": stages Ray fused into one operator share its time
            fused = re.findall(r"MapBatches\(([^()]+)\)", op.operator_name)
            for name in fused:
                if name in names:
                    out[name] = {"operator": op.operator_name, "wall_s": round(op.time_total_s or 0.0, 3),
                                 "fused_with": [f for f in fused if f != name]}
    return out


def _ray_path(uri: str) -> str:
    """Path form Ray Data's readers/writers expect with an explicit filesystem."""
    return uri if io.is_remote(uri) else io.filesystem(uri)[1]


def execute(pipeline, recipe: Recipe, p: Plan, out: str, input_table: pa.Table) -> dict[str, dict]:
    """Run the Ray Data pipeline over the rows not yet committed; returns per-stage stats."""
    import ray.data
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    fs, _ = io.filesystem(out)
    ctx = DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column=R.ID, checkpoint_path=_ray_path(work(out, "checkpoint")),
        delete_checkpoint_on_success=False, override_filesystem=fs if io.is_remote(out) else None)
    n_blocks = max(1, math.ceil(input_table.num_rows / max(1, recipe.block_rows)))
    in_uri = work(out, "input")
    # Split into blocks of block_rows rows: a block is the unit of progress a resumed run keeps
    # (the parquet reader would otherwise coalesce small files into one block).
    # Read/write tasks take a small CPU share: model actors hold most CPUs of a small box, and
    # a 1-CPU read task would then wait forever behind them.
    ds = ray.data.read_parquet(_ray_path(in_uri), filesystem=fs, num_cpus=IO_NUM_CPUS).repartition(n_blocks)
    if hasattr(pipeline, "before_run"):
        pipeline.before_run(recipe, out)
    for sp in p.row_stages():
        ds = add_stage(ds, sp.stage, sp.cfg, sp.resolved, audit=sp.audit)
    rows_uri = work(out, "rows")
    # min_bytes_per_file=1: every block is committed as soon as it is done (the resume unit),
    # instead of Ray combining small blocks into one file written at the end.
    try:
        ds.write_parquet(_ray_path(rows_uri), filesystem=fs, min_bytes_per_file=1,
                         ray_remote_args={"num_cpus": IO_NUM_CPUS})
    finally:
        ctx.checkpoint_config = None  # do not leak into later writes of this process
    return _stage_wall_times(ds, [sp.stage.name for sp in p.row_stages()])


def reached(rows: pa.Table, order: list[str], stage: str, through: bool = False) -> list[bool]:
    """Per row: did it enter ``stage`` (``through=True``: get through it)? A row is ok, or
    stopped (rejected/errored) at a stage of ``order``; rows stopped at ingest never enter."""
    pos = {s: k for k, s in enumerate(order)}
    k = pos[stage]
    return [st == R.OK or (pos.get(sg, -1) > k if through else pos.get(sg, -1) >= k)
            for st, sg in zip(rows.column(R.STATUS).to_pylist(), rows.column(R.STAGE).to_pylist())]


def funnel(p: Plan, rows: pa.Table, ingest_rejects: int, n_input: int, not_selected: int = 0) -> list[dict]:
    """Per-stage counts: rows in = out + rejected + errored (computed from the committed rows).

    The ingest row also counts ``not_selected`` (valid rows left out by ``--limit``). LLM
    stages add ``llm_attempts_total``, ``llm_repaired_total`` and ``llm_parse_failures``
    (rows whose first reply did not validate); the image stage adds
    ``prompt_weights_stripped`` (rows whose (object:w) weights the pipeline could not apply).
    """
    order = [sp.stage.name for sp in p.row_stages()]
    result = [{"stage": "ingest", "in": n_input + ingest_rejects + not_selected, "out": n_input,
               "rejected": ingest_rejects, "errored": 0, "not_selected": not_selected}]
    status = rows.column(R.STATUS).to_pylist()
    stage = rows.column(R.STAGE).to_pylist()
    for sp in p.row_stages():
        entered = sum(reached(rows, order, sp.stage.name))
        rej = sum(1 for s, st in zip(status, stage) if st == sp.stage.name and s == R.REJECTED)
        err = sum(1 for s, st in zip(status, stage) if st == sp.stage.name and s == R.ERROR)
        row = {"stage": sp.stage.name, "in": entered, "out": entered - rej - err,
               "rejected": rej, "errored": err}
        for c in ("llm_attempts", "llm_repaired"):
            col = f"{sp.stage.name}_{c}"
            if col in rows.column_names:
                vals = [v for v in rows.column(col).to_pylist() if v is not None]
                row[f"{c}_total"] = int(sum(int(v) for v in vals))
                if c == "llm_attempts":
                    row["llm_parse_failures"] = sum(1 for v in vals if int(v) > 1) + (
                        rej if not sp.cfg.params.get("max_repairs", 1) else 0)
        if "prompt_weights_stripped" in sp.outputs and "prompt_weights_stripped" in rows.column_names:
            row["prompt_weights_stripped"] = sum(1 for v in rows.column("prompt_weights_stripped").to_pylist() if v)
        if sp.audit:
            row["audit_would_reject"] = sum(1 for a in rows.column(R.AUDIT).to_pylist()
                                            if a and f"{sp.stage.name}:" in a)
        result.append(row)
    return result


def print_funnel(rows: list[dict], file=sys.stdout) -> None:
    """Print the funnel as an aligned table."""
    print(f"{'stage':<24}{'in':>8}{'out':>8}{'rejected':>10}{'errored':>9}{'wall_s':>9}", file=file)
    for r in rows:
        wall = r.get("wall_s")
        print(f"{r['stage']:<24}{r['in']:>8}{r['out']:>8}{r['rejected']:>10}{r['errored']:>9}"
              f"{'' if wall is None else f'{wall:.2f}':>9}", file=file)


def _versions() -> dict[str, str]:
    v = {}
    for pkg in PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def _split_outputs(rows: pa.Table, out: str, ingest: pa.Table | None) -> None:
    """Write rejects/ and errors/ (full rows as parquet, id/stage/reason as JSONL); ``ingest``
    holds the rejects of the ingest step, listed first in ``rejects.jsonl``."""
    status = rows.column(R.STATUS)
    for st, folder in ((R.REJECTED, "rejects"), (R.ERROR, "errors")):
        mask = pc.equal(status, st)
        sel = rows.filter(mask)
        recs = [{"id": i, "stage": s, "reason": (json.loads(r) if st == R.ERROR else r)}
                for i, s, r in zip(sel.column(R.ID).to_pylist(), sel.column(R.STAGE).to_pylist(),
                                   sel.column(R.REASON).to_pylist())]
        if ingest is not None and st == R.REJECTED:
            recs = ingest.select(["id", "stage", "reason"]).to_pylist() + recs
        write_table(sel, io.join(out, folder, f"{folder}.parquet"))
        write_jsonl(recs, io.join(out, folder, f"{folder}.jsonl"))


def run(pipeline, recipe: Recipe, argv: list[str], address: str | None = None) -> dict:
    """Run (or resume) a pipeline end to end and return the manifest.

    ``address``: a Ray cluster to connect to; default ``$RAY_ADDRESS`` (set inside a Ray
    job), else a private local cluster.
    """
    if not recipe.output:
        raise RecipeError("--output is required")
    out = recipe.output.rstrip("/")
    p = plan(pipeline, recipe)
    started = datetime.now(timezone.utc)
    t0 = time.time()
    _ray_init(address)
    import ray

    input_table, not_selected = _ingest(pipeline, recipe, out)
    done = read_table(work(out, "rows"), columns=[R.ID])
    done_ids = set(done.column(R.ID).to_pylist()) if done is not None else set()
    todo = [i for i in input_table.column(R.ID).to_pylist() if i not in done_ids]
    stage_stats: dict[str, dict] = {}
    if todo:
        stage_stats = execute(pipeline, recipe, p, out, input_table)
    rows = _exactly_once(read_table(work(out, "rows")), input_table)
    ingest_rej = read_table(work(out, "ingest_rejects"))
    n_ingest_rej = ingest_rej.num_rows if ingest_rej is not None else 0
    fun = funnel(p, rows, n_ingest_rej, input_table.num_rows, not_selected)
    previous = load_manifest(out) if io.exists(io.join(out, "manifest.json")) else None
    if not stage_stats and previous:  # nothing ran now: keep the timings of the run that did the work
        stage_stats = {r["stage"]: r for r in previous.get("funnel", []) if "wall_s" in r}
    for r in fun:
        if r["stage"] in stage_stats:
            r.update({k: stage_stats[r["stage"]][k] for k in ("wall_s", "operator", "fused_with")
                      if k in stage_stats[r["stage"]]})
    _split_outputs(rows, out, ingest_rej)
    exported = pipeline.export(rows, recipe, out)
    # a pipeline whose last step selects among sub-row units (MM-GEN's loss filter over
    # samples) reports it as extra funnel rows: {"stage", "in", "out", "rejected", "errored", "unit"}
    fun.extend(exported.pop("funnel", []) if isinstance(exported, dict) else [])
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
        "resumed": bool(done_ids),
        "rows_processed_this_run": len(todo),
        "runs": (previous or {}).get("runs", []) + [{"started": started.isoformat(), "rows_processed": len(todo),
                                                     "wall_s": round(time.time() - t0, 2), "command": argv}],
        "funnel": fun,
        "outputs": exported,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    io.write_text(io.join(out, "manifest.json"), json.dumps(manifest, indent=2, default=str))
    return manifest


def _exactly_once(rows: pa.Table, input_table: pa.Table) -> pa.Table:
    """Committed rows, one per input id. Ray Data commits each block once; a row could only
    appear twice if a block were recomputed after a crash between its write and its
    checkpoint record, and then the first copy is kept. Raises ``RuntimeError`` if an
    input id has no committed row (a row would be lost)."""
    ids = rows.column(R.ID).to_pylist()
    first: dict[str, int] = {}
    for k, i in enumerate(ids):
        first.setdefault(i, k)
    if len(first) != len(ids):
        rows = rows.take(pa.array(sorted(first.values()), pa.int64()))
    missing = set(input_table.column(R.ID).to_pylist()) - set(first)
    if missing:
        raise RuntimeError(f"{len(missing)} input rows have no committed result (e.g. {sorted(missing)[:3]}); "
                           "rerun the same command to process them")
    return rows


def load_manifest(out: str) -> dict:
    """Read ``OUT/manifest.json``; raises ``FileNotFoundError`` naming the folder."""
    uri = io.join(out, "manifest.json")
    if not io.exists(uri):
        raise FileNotFoundError(f"no manifest.json in {out} (has the run finished?)")
    return json.loads(io.read_text(uri))
